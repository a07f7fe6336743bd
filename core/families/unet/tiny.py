"""Tiny random SD1.5 / SDXL models, built locally (nothing can be downloaded): a diffusers folder
with the real family's layout, and the same model as ONE single-file checkpoint as ComfyUI keeps
it in models/checkpoints.

The tiny models follow the real families' rules where a file cannot say them: UNet attention
heads (SD1.5: 8 heads; SDXL: 64 channels a head) and 32 norm groups, so the single file loads by
its shapes alone. The text encoders keep CLIP's real 49408-token vocabulary, so ComfyUI's
tokenizer works with them; their head counts go into the file's metadata."""
import os

import torch

from . import keys

from .keys import HEADS_2_KEY, HEADS_KEY, V_PRED_KEY

CLIP_VOCAB = 49408

UNET = {
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, use_linear_projection=False),
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(1, 1),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 cross_attention_dim=32 + 48, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8),
}
SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def _clip_config(hidden_act, width, heads):
    from transformers import CLIPTextConfig

    # eos_token_id 2 as in the real SD configs: the pooled token is the highest id (the end token)
    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=hidden_act, projection_dim=width,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _tokenizers(folder, family, comfyui):
    """CLIP's real tokenizer from ComfyUI's source when found, else FLUX's tiny one (its ids
    fit the real-size embedding); SDXL's second pads with "!" as OpenCLIP does."""
    from transformers import CLIPTokenizer

    from ..parts.tiny import write_clip_tokenizer
    from .load import ModelError, load_tokenizers

    try:
        return load_tokenizers(family, comfyui)
    except ModelError:
        source = os.path.join(folder, "tokenizer")
        write_clip_tokenizer(source)  # save_pretrained writes over it in the same place
    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(source, model_max_length=77)}
    if family == "sdxl":
        tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, model_max_length=77, pad_token="!")
    return tokenizers


def build_tiny(family, folder, seed=0, comfyui=None):
    """Writes a random tiny diffusers folder of `family` ("sd15" or "sdxl"); returns the folder.
    `comfyui`: ComfyUI's folder, whose CLIP tokenizer is used if found (also env LORALAB_COMFYUI)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in UNET:
        raise ValueError(f"family must be 'sd15' or 'sdxl', not {family!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, norm_num_groups=32,
                                **UNET[family])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=64,
                        scaling_factor=SCALING[family])
    scheduler = EulerDiscreteScheduler.from_pretrained(
        os.path.join(os.path.dirname(__file__), "configs", family), subfolder="scheduler")
    text_encoder = CLIPTextModel(_clip_config("quick_gelu", 32, 2))
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                 **_tokenizers(folder, family, comfyui))
    if family == "sdxl":
        # wider than the first, as in SDXL (bigG 1280 > CLIP-L 768): readers tell them apart by width
        parts["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config("gelu", 48, 3))
        pipeline = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def folder_family(folder):
    import json

    with open(os.path.join(folder, "model_index.json")) as f:
        return "sdxl" if json.load(f)["_class_name"].startswith("StableDiffusionXL") else "sd15"


def checkpoint_weights(folder):
    """(the folder's model as {single-file key: tensor}, metadata)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = folder_family(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    state = unet.state_dict()
    weights = {keys.UNET_PREFIX + ldm: state[d] for d, ldm in keys.unet_to_ldm(state, unet.config).items()}
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    state = vae.state_dict()
    mapping = keys.vae_to_ldm({k: v.shape for k, v in state.items()}, len(vae.config.block_out_channels))
    weights.update({keys.VAE_PREFIX + ldm: state[d].reshape(shape) for ldm, (d, shape) in mapping.items()})
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    prefix = keys.SD15_CLIP_PREFIX if family == "sd15" else keys.SDXL_CLIP_PREFIX
    weights.update({prefix + keys.clip_key(k): v for k, v in clip.state_dict().items()
                    if not k.endswith("position_ids")})
    metadata = {HEADS_KEY: str(clip.config.num_attention_heads)}
    if family == "sdxl":
        clip_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
        openclip = keys.openclip_from_diffusers(clip_2.state_dict())
        openclip["logit_scale"] = torch.tensor(4.6052)  # as in SDXL's file; nothing reads it
        weights.update({keys.SDXL_OPENCLIP_PREFIX + k: v for k, v in openclip.items()})
        metadata[HEADS_2_KEY] = str(clip_2.config.num_attention_heads)
    return weights, metadata


def write_single_file(folder, path, v_prediction=False):
    """The folder's model as one LDM-keyed checkpoint (UNet, VAE, text encoders) at `path`; with
    ComfyUI's `v_pred` key when `v_prediction`. Returns the path."""
    from safetensors.torch import save_file

    weights, metadata = checkpoint_weights(folder)
    if v_prediction:
        weights[V_PRED_KEY] = torch.tensor([])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata=metadata)
    return path
