"""Tiny random FLUX.1 pipelines, built locally: the tests, the quickstart and the benchmark use
them because nothing can be downloaded from a model hub.

The folder has the layout of a real FLUX.1 diffusers folder (transformer, vae, text_encoder,
tokenizer, text_encoder_2, tokenizer_2, scheduler), so it loads through the same code path as
black-forest-labs/FLUX.1-dev does.
"""
import json
import os

import torch

from ..parts.autoencoder import vae_to_bfl
from ..parts.tiny import CAPTION_WORDS, random_init, scaled_fp8, tiny_ae, write_bfl_vae, write_clip_tokenizer

# Model shapes by preset. "tiny" trains in seconds on a CPU; "small" is FLUX-shaped (same block
# structure, wider) for the benchmark.
PRESETS = {
    "tiny": dict(layers=2, single_layers=2, heads=4, head_dim=16, rope=(4, 6, 6),
                 text_dim=64, clip_dim=64, vae_channels=(16, 32, 32), latent_channels=4),
    "small": dict(layers=4, single_layers=8, heads=8, head_dim=32, rope=(8, 12, 12),
                  text_dim=256, clip_dim=128, vae_channels=(32, 64, 64), latent_channels=16),
}

# T5 tokens the tiny random models read (FLUX.1 reads 512): their captions are a few words, and at
# 64 px a step attends over 80 tokens in place of 528 (as the shapes model does, shapes/packed.py).
TEXT_LENGTH = 64


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -5.0) for word in CAPTION_WORDS]
    pieces += [(chr(c), -10.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -10.0) for c in range(ord("0"), ord("9") + 1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TEXT_LENGTH)


def build_tiny_flux(folder, preset="tiny", seed=0):
    """Write a random FLUX.1 diffusers folder of the given preset size; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    clip_tokenizer = write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    t5_tokenizer = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=shape["clip_dim"],
        intermediate_size=shape["clip_dim"] * 2, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=shape["clip_dim"],
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=shape["text_dim"], d_ff=shape["text_dim"] * 2,
        d_kv=16, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = tiny_ae(shape)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=shape["latent_channels"] * 4,
        num_layers=shape["layers"], num_single_layers=shape["single_layers"],
        attention_head_dim=shape["head_dim"], num_attention_heads=shape["heads"],
        joint_attention_dim=shape["text_dim"], pooled_projection_dim=shape["clip_dim"],
        guidance_embeds=True, axes_dims_rope=shape["rope"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                            tokenizer=clip_tokenizer, text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer, transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder


def write_single_file(folder, path):
    """The folder's transformer as one BFL-keyed .safetensors, as ComfyUI keeps FLUX.1 files."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from .keys import transformer_to_bfl

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = transformer.config
    weights = transformer_to_bfl(transformer.state_dict(), config.num_layers, config.num_single_layers)
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------
# The same tiny model as the single files ComfyUI users have (models/diffusion_models,
# text_encoders, vae), in the key layouts ComfyUI's own loaders read.

CLIP_VOCAB, T5_VOCAB = 49408, 32128  # the real tokenizers' vocabularies (ComfyUI's checkout)


def _padded_rows(weight, rows, seed):
    """An embedding grown to `rows` (the real vocabulary): its own rows first, then small random
    ones, so the same token ids give the same embeddings."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(rows - weight.shape[0], weight.shape[1], generator=generator) * weight.float().std()
    return torch.cat([weight.float(), extra]).to(weight.dtype)


def write_comfyui_files(folder):
    """The folder's tiny model as ComfyUI's single files, beside it in FOLDER/comfyui/: paths
    {"transformer", "transformer_fp8", "clip_l", "t5", "vae"}. The text encoders' embeddings are
    grown to the real CLIP/T5 vocabularies (ComfyUI's tokenizers), the tiny ids keeping theirs."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5EncoderModel

    from ..parts import files
    from . import single_files
    from .keys import transformer_to_bfl

    out = os.path.join(folder, "comfyui")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    paths = {
        "transformer": os.path.join(out, "diffusion_models", "tiny-flux.safetensors"),
        "transformer_fp8": os.path.join(out, "diffusion_models", "tiny-flux-fp8.safetensors"),
        "clip_l": os.path.join(out, "text_encoders", "clip_l.safetensors"),
        "t5": os.path.join(out, "text_encoders", "t5xxl.safetensors"),
        "vae": os.path.join(out, "vae", "ae.safetensors"),
    }
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = transformer.config
    bfl = transformer_to_bfl(transformer.state_dict(), config.num_layers, config.num_single_layers)
    bfl = {k: v.to(torch.bfloat16).contiguous() for k, v in bfl.items()}
    meta = {files.AXES_METADATA_KEY: json.dumps(list(config.axes_dims_rope))}
    save_file(bfl, paths["transformer"], metadata=meta)
    save_file(scaled_fp8(bfl, ("double_blocks.", "single_blocks.")), paths["transformer_fp8"], metadata=meta)

    clip = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    weights = {("text_model." + k if not k.startswith("text_model.") else k): v.contiguous()
               for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    embed = "text_model.embeddings.token_embedding.weight"
    weights[embed] = _padded_rows(weights[embed], CLIP_VOCAB, 1)
    weights["text_projection.weight"] = torch.eye(clip.config.hidden_size)
    save_file(weights, paths["clip_l"],
              metadata={single_files.CLIP_HEADS_KEY: str(clip.config.num_attention_heads)})

    t5 = T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_2"))
    weights = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    weights["shared.weight"] = _padded_rows(weights["shared.weight"], T5_VOCAB, 2)
    save_file(weights, paths["t5"])

    write_bfl_vae(os.path.join(folder, "vae"), paths["vae"])
    return paths


def write_real_width_files(folder, seed=0):
    """FLUX-width single files for the benchmark, random, written tensor by tensor (little RAM):
    a transformer of hidden 3072 / 24 heads with one double and one single block (bf16, BFL
    keys), a T5 of T5-XXL's widths with one layer, a real-shape CLIP-L and FLUX.1's VAE."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..parts import files
    from ..parts.autoencoder import VAE_GROUPS_KEY
    from . import keys, single_files

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    bf16 = torch.bfloat16
    paths = {name: os.path.join(folder, file) for name, file in (
        ("transformer", "flux-real-width.safetensors"), ("clip_l", "clip_l.safetensors"),
        ("t5", "t5xxl-1-layer.safetensors"), ("vae", "ae.safetensors"))}
    with init_empty_weights():
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, projection_dim=768))
        t5 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                     num_layers=1, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
    shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    bfl_shapes = {}
    for bfl_key, diffusers_key, _ in keys._one_to_one(1, 1):
        if diffusers_key in shapes:
            bfl_shapes[bfl_key] = shapes[diffusers_key]
    for bfl_name, parts in keys.block_modules(1, 1):
        for suffix in ("weight", "bias"):
            part_shapes = [shapes[f"{p}.{suffix}"] for p in parts]
            bfl_shapes[f"{bfl_name}.{suffix}"] = (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
    files.write_streaming(paths["transformer"], [(k, s, bf16, random_init(s, k)) for k, s in bfl_shapes.items()])

    clip_shapes = {("text_model." + k if not k.startswith("text_model.") else k): tuple(v.shape)
                   for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    clip_shapes["text_projection.weight"] = (768, 768)
    files.write_streaming(paths["clip_l"], [(k, s, bf16, random_init(s, k)) for k, s in clip_shapes.items()],
                          {single_files.CLIP_HEADS_KEY: "12"})
    t5_shapes = {k: tuple(v.shape) for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    files.write_streaming(paths["t5"], [(k, s, bf16, random_init(s, k)) for k, s in t5_shapes.items()])
    mapping = vae_to_bfl({k: tuple(v.shape) for k, v in vae.state_dict().items()}, 4)
    files.write_streaming(paths["vae"], [(b, s, bf16, random_init(s, b)) for b, (_, s) in mapping.items()],
                          {VAE_GROUPS_KEY: "32"})
    return paths


