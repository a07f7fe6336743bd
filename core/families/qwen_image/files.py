"""Qwen-Image from ComfyUI's files (models/diffusion_models qwen_image_*.safetensors,
text_encoders qwen_2.5_vl_7b*.safetensors, vae qwen_image_vae.safetensors): each part built
empty on the meta device and filled tensor by tensor, as FLUX.1's single files are
(flux/single_files.py's streaming reader and filler).

ComfyUI's Qwen-Image transformer keeps diffusers' module names (comfy/ldm/qwen_image/model.py;
comfy/model_detection.py knows it by `txt_norm.weight`), behind `model.diffusion_model.` when
ComfyUI saved it. Its text encoder keeps Qwen2.5-VL's original names (`model.layers.*`,
`visual.*`), which transformers 5 nests as `model.language_model.*` / `model.visual.*`. Its VAE
is Wan 2.1's layout, which diffusers' convert_wan_vae_to_diffusers maps."""
import os
import re

from .. import describe_file as describe
from ..base import ModelError
from ..parts import fp8 as fp8_ops
from ..parts.files import (SafetensorsFile, checked_file, count_layers, default_axes, folder_transformer_files,
                           is_scale_key, read_header)
from ..parts.streaming import check_complete, empty_model, fill, freeze, identity_plan

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
HEAD_DIM_KEY = "loralab.head_dim"  # what shapes cannot tell of a text encoder narrower than 7B
VISION_HEADS_KEY = "loralab.vision_heads"

SLOTS = {  # kind -> (setting, what to give)
    "qwen_image_transformer": ("model.transformer_path", "a Qwen-Image transformer (ComfyUI's "
                               "models/diffusion_models/qwen_image_bf16.safetensors or _fp8_e4m3fn)"),
    "qwen25_vl": ("model.text_encoder_path", "the Qwen2.5-VL 7B text encoder (ComfyUI's models/"
                  "text_encoders/qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors)"),
    "qwen_image_vae": ("model.vae_path", "the Qwen-Image VAE (ComfyUI's models/vae/qwen_image_vae.safetensors)"),
}


def transformer_prefix(names):
    for prefix in TRANSFORMER_PREFIXES:
        if prefix + "txt_norm.weight" in names:
            return prefix
    return ""


def kind(names):
    """"qwen_image_transformer", "qwen25_vl", "qwen_image_vae" or None, from key names."""
    names = set(names)
    prefix = transformer_prefix(names)
    if prefix + "txt_norm.weight" in names and prefix + "img_in.weight" in names:
        return "qwen_image_transformer"
    if "model.layers.0.self_attn.k_proj.bias" in names or \
            "model.language_model.layers.0.self_attn.k_proj.bias" in names:
        return "qwen25_vl"
    if "decoder.middle.0.residual.0.gamma" in names and "encoder.conv1.weight" in names:
        return "qwen_image_vae"
    return None


def describe_part(tensors):
    """Words for a Qwen-Image transformer, text encoder or VAE (ModelFamily.describe_file)."""
    found = kind(tensors)
    return SLOTS[found][1] if found else None


def check_file(expected, path):
    """The file's absolute path, after checking it exists and is the part `expected`."""
    setting, wanted = SLOTS[expected]

    def looks(path):  # another part of Qwen-Image in its own words
        try:
            found = kind(read_header(path)[0])
        except (OSError, ValueError):
            found = None
        return SLOTS[found][1] if found else describe(path)

    return checked_file(path, setting, wanted, lambda tensors: kind(tensors) == expected, looks)


def names_qwen_image(model_cfg):
    """Whether a model section's ComfyUI files are Qwen-Image's (model.family auto)."""
    for key in ("transformer_path", "text_encoder_path"):
        path = model_cfg.get(key)
        if path and os.path.isfile(os.path.expanduser(path)):
            try:
                found = kind(read_header(os.path.expanduser(path))[0])
            except (OSError, ValueError):
                continue
            return found in ("qwen_image_transformer", "qwen25_vl")
    return False


# ---------------------------------------------------------------------------------------------
# Transformer


def transformer_config(tensors):
    """QwenImageTransformer2DModel's config from a file's shapes (diffusers' names, any prefix)."""
    prefix = transformer_prefix(tensors)
    shape = lambda name: tensors[prefix + name]["shape"]  # noqa: E731
    inner, in_channels = shape("img_in.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    return {"patch_size": 2, "in_channels": int(in_channels), "out_channels": int(shape("proj_out.weight")[0]) // 4,
            "num_layers": count_layers(tensors, re.escape(prefix) + r"transformer_blocks\.(\d+)\."),
            "attention_head_dim": int(head_dim), "num_attention_heads": int(inner) // int(head_dim),
            "joint_attention_dim": int(shape("txt_in.weight")[1]),
            "axes_dims_rope": default_axes(int(head_dim))}  # Qwen-Image's (16, 56, 56) at 128


def load_transformer(path, folder, dtype, quantize="none"):
    """QwenImageTransformer2DModel from ComfyUI's file (bf16, fp8_e4m3fn or scaled fp8), or from
    the folder's shards when only quantize "fp8" asks for a conversion. quantize "fp8" keeps the
    block linears in fp8; otherwise fp8 weights are dequantised to `dtype`."""
    from diffusers import QwenImageTransformer2DModel

    setting = "model.transformer_path" if path else "model.path"
    if path:
        paths = [check_file("qwen_image_transformer", path)]
    else:
        paths = folder_transformer_files(folder)
        if not paths:
            raise ModelError(f"model.quantize = \"fp8\": {folder}/transformer has no .safetensors "
                             "weights to convert; give model.transformer_path or set model.quantize to \"none\".")
    headers = [SafetensorsFile(p) for p in paths]
    tensors = {k: v for h in headers for k, v in h.tensors.items()}
    prefix = transformer_prefix(tensors)
    model = empty_model(lambda: QwenImageTransformer2DModel.from_config(transformer_config(tensors)))
    fp8_names = set(fp8_ops.replace_block_linears(model, dtype)) if quantize == "fp8" else set()
    for header in headers:
        with header as source:
            fill(model, source, identity_plan(source, model, lambda k: k[len(prefix):]), dtype, setting, fp8_names)
    check_complete(model, setting, paths[0])
    return freeze(model)


# ---------------------------------------------------------------------------------------------
# Text encoder


def _text_encoder_name(key):
    """ComfyUI's / Qwen's original key -> transformers 5's Qwen2_5_VLForConditionalGeneration key."""
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


def text_encoder_config(tensors, metadata):
    """Qwen2_5_VLConfig from a file's shapes: 7B's head width 128 (narrower test files say theirs
    in metadata) and mrope sections; the vision tower's shapes when the file has one."""
    from transformers import Qwen2_5_VLConfig

    from .tiny import mrope_section

    names = {_text_encoder_name(k): v["shape"] for k, v in tensors.items() if not is_scale_key(k)}
    shape = lambda name: names[name]  # noqa: E731
    text = "model.language_model."
    vocab, hidden = shape(text + "embed_tokens.weight")
    head_dim = int(metadata.get(HEAD_DIM_KEY, 128))
    vision = {}
    if "model.visual.blocks.0.attn.qkv.weight" in names:
        width = shape("model.visual.blocks.0.attn.qkv.weight")[1]
        vision = dict(depth=count_layers(names, r"model\.visual\.blocks\.(\d+)\."), hidden_size=width,
                      intermediate_size=shape("model.visual.blocks.0.mlp.gate_proj.weight")[0],
                      num_heads=int(metadata.get(VISION_HEADS_KEY, 16)),
                      out_hidden_size=shape("model.visual.merger.mlp.2.weight")[0])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=shape(text + "layers.0.mlp.gate_proj.weight")[0],
                         num_hidden_layers=count_layers(names, re.escape(text) + r"layers\.(\d+)\."),
                         num_attention_heads=shape(text + "layers.0.self_attn.q_proj.weight")[0] // head_dim,
                         num_key_value_heads=shape(text + "layers.0.self_attn.k_proj.weight")[0] // head_dim,
                         rms_norm_eps=1e-6, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": mrope_section(head_dim)}),
        vision_config=vision or None, tie_word_embeddings="lm_head.weight" not in names)


def load_text_encoder(path, dtype):
    """Qwen2_5_VLForConditionalGeneration from ComfyUI's file (bf16 or fp8 scaled, dequantised
    to `dtype`). ComfyUI's file has no lm_head (its logits are never read here): tied then."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = check_file("qwen25_vl", path)
    with SafetensorsFile(path) as source:
        config = text_encoder_config(source.tensors, source.metadata)
        model = empty_model(lambda: Qwen2_5_VLForConditionalGeneration(config))
        fill(model, source, identity_plan(source, model, _text_encoder_name), dtype, "model.text_encoder_path")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    check_complete(model, "model.text_encoder_path", path)
    return freeze(model)


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_names(names):
    """{diffusers key: Wan 2.1 key} by diffusers' own converter (it only renames)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers({name: name for name in names})


RESIDUAL = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
            ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def wan_names(diffusers_keys):
    """{diffusers key: Wan 2.1 key} for writing ComfyUI's layout: the converter's renames turned
    round, each checked by the converter itself mapping it back."""
    def wan(key):
        key = re.sub(r"^quant_conv\.", "conv1.", re.sub(r"^post_quant_conv\.", "conv2.", key))
        key = key.replace("conv_in.", "conv1.").replace("norm_out.gamma", "head.0.gamma").replace("conv_out.", "head.2.")
        key = key.replace("mid_block.attentions.0.", "middle.1.")
        key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m.group(1))}.", key)
        key = key.replace("encoder.down_blocks.", "encoder.downsamples.")
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.upsamples.{4 * int(m.group(1)) + 3}.", key)
        if re.search(r"(middle\.[02]|samples\.\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)", key):
            for ours, theirs in RESIDUAL:
                key = re.sub(r"(middle\.[02]|samples\.\d+)\." + re.escape(ours), r"\1." + theirs, key)
        return key

    mapping = {key: wan(key) for key in diffusers_keys}
    back = _vae_names(mapping.values())
    wrong = [k for k, v in mapping.items() if back.get(k) != v]
    if wrong:
        raise ValueError(f"no Wan 2.1 name for {wrong[:3]}")
    return mapping


def load_vae(path, dtype):
    """AutoencoderKLQwenImage from ComfyUI's qwen_image_vae (Wan 2.1's layout): Qwen-Image's
    structure (4 levels, 2 resnets each) at the file's base width; latents_mean / latents_std
    are Qwen-Image's (the class's defaults)."""
    from diffusers import AutoencoderKLQwenImage

    path = check_file("qwen_image_vae", path)
    with SafetensorsFile(path) as source:
        base = source.tensors["encoder.conv1.weight"]["shape"][0]
        z_dim = source.tensors["conv2.weight"]["shape"][0]
        model = empty_model(lambda: AutoencoderKLQwenImage(base_dim=base, z_dim=z_dim))
        renamed = {wan: ours for ours, wan in _vae_names(source.keys()).items()}
        fill(model, source, identity_plan(source, model, lambda k: renamed.get(k, k)), dtype, "model.vae_path")
    check_complete(model, "model.vae_path", path)
    return freeze(model)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def tokenizer(comfyui=None, model_files=()):
    from transformers import Qwen2Tokenizer

    from .text import find_tokenizer

    return Qwen2Tokenizer.from_pretrained(find_tokenizer(comfyui, [f for f in model_files if f]),
                                          local_files_only=True)
