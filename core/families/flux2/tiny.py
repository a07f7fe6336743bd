"""Tiny random FLUX.2 klein pipelines, built locally from diffusers' and transformers' own classes
(Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM), for tests and tries: nothing can
be downloaded from a model hub. The folder has a real klein diffusers folder's layout
(transformer, text_encoder, tokenizer, vae, scheduler), so it loads as FLUX.2-klein-base-4B does;
write_comfyui_files writes the same model as ComfyUI's single files."""
import json
import os

import torch

from ..parts.tiny import QWEN3_VOCAB, write_qwen3_tokenizer  # klein reads prompts with Qwen3, as Z-Image

PRESETS = {
    # inner dim = heads x head_dim = heads x sum(axes_dims_rope) (four rope axes, as klein's);
    # Qwen3 needs 27 layers: klein stacks its hidden states 9, 18 and 27 (Flux2KleinPipeline);
    # the timestep embedding is 256 wide, as ComfyUI's Flux2 builds it whatever the width
    "tiny": dict(heads=2, head_dim=16, axes_dims=(4, 4, 4, 4), layers=1, single_layers=2, text_dim=16,
                 text_layers=27, vae_channels=(16, 32), latent_channels=8),
}


def tiny_vae(shape):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(latent_channels=shape["latent_channels"], block_out_channels=shape["vae_channels"],
                             layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * len(shape["vae_channels"]),
                             up_block_types=("UpDecoderBlock2D",) * len(shape["vae_channels"]))
    # running statistics that are not the identity, so that the normalisation is exercised
    vae.bn.running_mean.uniform_(-0.2, 0.2)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def build_tiny(folder, preset="tiny", seed=0):
    """Write a random FLUX.2 klein diffusers folder; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = write_qwen3_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=shape["text_dim"], intermediate_size=shape["text_dim"] * 2,
        num_hidden_layers=shape["text_layers"], num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        rope_theta=1000000.0))  # Qwen3-4B's and -8B's, which ComfyUI's files do not say
    transformer = Flux2Transformer2DModel(
        in_channels=shape["latent_channels"] * 4, num_layers=shape["layers"], num_single_layers=shape["single_layers"],
        attention_head_dim=shape["head_dim"], num_attention_heads=shape["heads"],
        joint_attention_dim=3 * shape["text_dim"], timestep_guidance_channels=256,
        axes_dims_rope=shape["axes_dims"], guidance_embeds=False)  # klein has no guidance embedding
    # klein's scheduler_config.json: the shift is computed per image size (the pipeline's mu)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipeline = Flux2KleinPipeline(scheduler=scheduler, vae=tiny_vae(shape), text_encoder=text_encoder,
                                  tokenizer=tokenizer, transformer=transformer, is_distilled=False)
    pipeline.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The same tiny model as the single files ComfyUI users have (models/diffusion_models,
# text_encoders, vae), in the key layouts ComfyUI's own loaders read.


def comfy_quant_fp8(weights, block_prefixes):
    """Weights as ComfyUI's newer fp8 files are: each block linear's weight float8_e4m3fn with a
    float32 `<layer>.weight_scale` and a `<layer>.comfy_quant` (its format as JSON bytes)."""
    from ..parts import fp8

    out = {}
    for key, value in weights.items():
        if key.startswith(block_prefixes) and key.endswith(".weight") and value.dim() == 2:
            layer = key[:-len(".weight")]
            out[key], scale = fp8.to_fp8(value)
            out[layer + ".weight_scale"] = scale.reshape(()).float()
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
        else:
            out[key] = value
    return out


def write_comfyui_files(folder):
    """The folder's tiny klein as ComfyUI's single files in FOLDER/comfyui/: paths {"transformer"
    (bf16, BFL's names), "transformer_fp8" (block weights cast to float8_e4m3fn), "transformer_scaled_fp8"
    (ComfyUI's old scaled fp8), "transformer_comfy_quant" (its newer per-layer fp8), "text_encoder"
    (qwen_3_4b's layout), "vae" (flux2-vae's layout)}."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    from ..parts.files import AXES_METADATA_KEY
    from ..parts.autoencoder import VAE_GROUPS_KEY
    from ..parts.tiny import scaled_fp8
    from .files import to_bfl_vae, to_comfyui_layout

    out = os.path.join(folder, "comfyui")
    models = os.path.join(out, "diffusion_models")
    paths = {"transformer": os.path.join(models, "flux-2-klein-base-tiny.safetensors"),
             "transformer_fp8": os.path.join(models, "flux-2-klein-base-tiny-fp8_e4m3fn.safetensors"),
             "transformer_scaled_fp8": os.path.join(models, "flux-2-klein-base-tiny-fp8_scaled.safetensors"),
             "transformer_comfy_quant": os.path.join(models, "flux-2-klein-base-tiny-fp8mixed.safetensors"),
             "text_encoder": os.path.join(out, "text_encoders", "tiny-qwen_3_4b.safetensors"),
             "vae": os.path.join(out, "vae", "flux2-vae-tiny.safetensors")}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    transformer = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    comfy = {k: v.to(torch.bfloat16).contiguous() for k, v in to_comfyui_layout(transformer.state_dict()).items()}
    meta = {AXES_METADATA_KEY: json.dumps([int(a) for a in transformer.config.axes_dims_rope])}
    blocks = ("double_blocks.", "single_blocks.")
    save_file(comfy, paths["transformer"], metadata=meta)
    save_file({k: v.to(torch.float8_e4m3fn) if k.startswith(blocks) and v.dim() == 2 else v for k, v in comfy.items()},
              paths["transformer_fp8"], metadata=meta)
    save_file(scaled_fp8(comfy, blocks), paths["transformer_scaled_fp8"], metadata=meta)
    save_file(comfy_quant_fp8(comfy, blocks), paths["transformer_comfy_quant"], metadata=meta)

    text_encoder = Qwen3ForCausalLM.from_pretrained(os.path.join(folder, "text_encoder"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in text_encoder.state_dict().items()
               if k.startswith("model.")}, paths["text_encoder"])  # ComfyUI's file has no lm_head
    vae = AutoencoderKLFlux2.from_pretrained(os.path.join(folder, "vae"))
    weights = to_bfl_vae(vae.state_dict(), len(vae.config.block_out_channels))
    save_file({k: v.contiguous() for k, v in weights.items()}, paths["vae"],
              metadata={VAE_GROUPS_KEY: str(vae.config.norm_num_groups)})
    return paths


def write_real_width_files(folder, parts=("transformer", "vae"), seed=0):
    """klein-4B-width single files for the load-memory benchmark, random, written tensor by tensor
    (little RAM): {"flux2_transformer": klein 4B's widths (3072 wide, 24 heads, 7680-wide text) with
    one double and one single block, in BFL's names, bf16; "flux2_vae": the FLUX.2 VAE at its real
    size} of the `parts` asked."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from ..parts.files import write_streaming
    from ..parts.tiny import random_init
    from .files import to_bfl_vae, to_comfyui_layout

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    paths = {"flux2_transformer": os.path.join(folder, "flux-2-klein-base-4b-2-blocks.safetensors"),
             "flux2_vae": os.path.join(folder, "flux2-vae.safetensors")}
    with init_empty_weights():  # diffusers' klein-4b config (scripts/convert_flux2_to_diffusers.py)
        transformer = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, num_attention_heads=24,
                                              joint_attention_dim=7680, guidance_embeds=False)
        vae = AutoencoderKLFlux2()
    if "transformer" in parts:
        shapes = {k: tuple(v.shape) for k, v in to_comfyui_layout(transformer.state_dict()).items()}
        write_streaming(paths["flux2_transformer"], [(k, s, torch.bfloat16, random_init(s, k)) for k, s in shapes.items()])
    if "vae" in parts:
        shapes = {k: tuple(v.shape) for k, v in to_bfl_vae(vae.state_dict(), 4).items()}
        write_streaming(paths["flux2_vae"], [(k, s, torch.float32 if k.startswith("bn.") else torch.bfloat16,
                                              random_init(s, k)) for k, s in shapes.items()])
    return {f"flux2_{part}": paths[f"flux2_{part}"] for part in parts}
