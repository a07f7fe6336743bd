"""What an SD1.5 / SDXL model on disk is: `detect` (family and prediction type of a single-file
checkpoint or a diffusers folder), and the diffusers configs of a single file's parts, read from
its tensor shapes over the real architecture's config that the package carries (configs/), so
real and tiny checkpoints both load."""
import copy
import json
import os
import re

from . import keys

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = ("sd15", "sdxl")


def packaged_config(family, part):
    """The real SD1.5 / SDXL-base config of `part` ("unet", "vae", "text_encoder", ...)."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    with open(os.path.join(CONFIGS, family, part, name)) as f:
        return json.load(f)


def _prediction_from_metadata(metadata):
    value = str(metadata.get("modelspec.prediction_type", "")).lower().replace("-", "_")
    return "v_prediction" if value in ("v", "v_prediction") else None


def detect(path):
    """{"family": "sdxl" | "sd15", "prediction_type": "epsilon" | "v_prediction"} of a single-file
    checkpoint (ComfyUI's models/checkpoints) or a diffusers folder; ValueError naming the file
    and what it looks like when it is neither."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        return _detect_folder(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or folder")
    from .. import describe_file as describe
    from ..parts.files import read_header

    try:
        tensors, metadata = read_header(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .safetensors checkpoint ({error})") from error
    family = family_of(tensors)
    if family is None:
        raise ValueError(f"{path} looks like {_describe(tensors, describe, path)}, not an SD1.5 or SDXL "
                         "checkpoint (one file with model.diffusion_model.*, first_stage_model.* and the "
                         "text encoder(s), as in ComfyUI's models/checkpoints).")
    prediction = "v_prediction" if keys_have_v_pred(tensors) else _prediction_from_metadata(metadata)
    return {"family": family, "prediction_type": prediction or "epsilon"}


def keys_have_v_pred(names):
    # ComfyUI saves v-prediction models with an empty `v_pred` tensor and reads them by it
    return keys.V_PRED_KEY in names


def family_of(names):
    """"sdxl", "sd15" or None, from a checkpoint's key names."""
    unet = any(k.startswith(keys.UNET_PREFIX + "input_blocks.") for k in names)
    if not unet:
        return None
    if any(k.startswith(keys.SDXL_OPENCLIP_PREFIX) for k in names) and \
            any(k.startswith(keys.SDXL_CLIP_PREFIX) for k in names):
        return "sdxl"
    if any(k.startswith(keys.SD15_CLIP_PREFIX) for k in names) and \
            not any(k.startswith(keys.UNET_PREFIX + "label_emb.") for k in names):
        return "sd15"
    return None


def describe_checkpoint(tensors):
    """Words for an SDXL or SD1.x/2.x checkpoint (ModelFamily.describe_file), None for another file."""
    if any(k.startswith("conditioner.embedders.1.") for k in tensors) or \
            keys.UNET_PREFIX + "label_emb.0.0.weight" in tensors:
        return "an SDXL checkpoint (UNet, VAE and text encoders in one file)"
    if any(k.startswith(keys.UNET_PREFIX + "input_blocks.") for k in tensors):
        return "a Stable Diffusion 1.x/2.x checkpoint (UNet, VAE and text encoder in one file)"
    return None


def _describe(tensors, describe, path):
    names = list(tensors)
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in names):
        return "an SDXL refiner checkpoint (no CLIP-L; it is not trained on its own)"
    if any(k.startswith(keys.UNET_PREFIX) for k in names):
        return "a UNet without its text encoders"
    return describe(path)


def _detect_folder(path):
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} has no model_index.json, so it is not a diffusers folder")
    with open(index) as f:
        name = json.load(f).get("_class_name", "")
    families = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15"}
    if name not in families:
        raise ValueError(f"{path} is a diffusers folder of {name or 'an unnamed pipeline'}, not of "
                         "StableDiffusionPipeline (SD1.5) or StableDiffusionXLPipeline (SDXL)")
    prediction = "epsilon"
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler) as f:
            prediction = json.load(f).get("prediction_type", "epsilon")
    return {"family": families[name], "prediction_type": prediction}


# ---------------------------------------------------------------------------------------------
# Configs from shapes ({key: shape}, without the part's prefix)


def _count(names, pattern):
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in map(regex.match, names) if m}
    return max(found) + 1 if found else 0


def unet_config(shapes, family, pooled_width=None):
    """The diffusers UNet config of LDM UNet keys: widths, depths, attention layout and the SDXL
    text_time embedding from the shapes; the rest (and head counts: SD1.5 8 heads, SDXL 64
    channels a head) as in the real family."""
    config = packaged_config(family, "unet")
    downsamples = sorted(int(m.group(1)) for m in map(re.compile(r"input_blocks\.(\d+)\.0\.op\.weight").match,
                                                       shapes) if m)
    levels = len(downsamples) + 1
    per_block = (_count(shapes, r"input_blocks\.(\d+)\.") - 1 - len(downsamples)) // levels
    channels, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (per_block + 1)
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        depth = _count(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        attention.append(depth > 0)
        depths.append(max(depth, 1))
    if not any(attention):
        raise ValueError("the UNet has no attention blocks")
    first_attention = next(f"input_blocks.{1 + i * (per_block + 1)}.1." for i in range(levels) if attention[i])
    config.update(
        in_channels=shapes["input_blocks.0.0.weight"][1], out_channels=shapes["out.2.weight"][0],
        block_out_channels=channels, layers_per_block=per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=shapes[first_attention + "transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_projection=len(shapes[first_attention + "proj_in.weight"]) == 2)
    if family == "sdxl":
        config["transformer_layers_per_block"] = depths
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
        embed_in = shapes["label_emb.0.0.weight"][1]
        if pooled_width is None:
            raise ValueError("an SDXL UNet's text_time embedding needs the pooled text width")
        config["projection_class_embeddings_input_dim"] = embed_in
        config["addition_time_embed_dim"] = (embed_in - pooled_width) // 6
    return config


def vae_config(shapes, family):
    """The diffusers AutoencoderKL config of LDM VAE keys (FLUX's reader, SD's scaling)."""
    from ..parts.autoencoder import vae_config as ldm_vae_config

    config = packaged_config(family, "vae")
    found = ldm_vae_config({k: {"shape": list(v)} for k, v in shapes.items()}, {})
    for name in ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                 "down_block_types", "up_block_types", "use_quant_conv", "use_post_quant_conv"):
        config[name] = list(found[name]) if isinstance(found[name], tuple) else found[name]
    return config


def clip_config(shapes, family, part, heads=None):
    """The transformers config (dict) of a text encoder from its diffusers-named shapes (no
    `text_model.`); heads from our metadata, else CLIP's 64 channels a head."""
    config = copy.deepcopy(packaged_config(family, part))
    vocab, width = shapes["embeddings.token_embedding.weight"]
    config.update(vocab_size=vocab, hidden_size=width,
                  intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                  num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
                  num_attention_heads=int(heads) if heads else width // 64,
                  max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
                  projection_dim=shapes["text_projection.weight"][0] if "text_projection.weight" in shapes
                  else width)
    return config
