"""Tiny random Z-Image pipelines, built locally from diffusers' and transformers' own classes
(ZImageTransformer2DModel, Qwen3Model, FLUX.1's AutoencoderKL), for tests and tries: nothing can
be downloaded from a model hub. The folder has a real Z-Image diffusers folder's layout
(transformer, text_encoder, tokenizer, vae, scheduler), so it loads as Tongyi-MAI/Z-Image does."""
import os

import torch

from ..parts.tiny import QWEN3_VOCAB, write_qwen3_tokenizer

PRESETS = {
    # dim = heads x sum(axes_dims); ComfyUI and the FLUX.1 ae have 16 latent channels, and
    # ComfyUI's Z-Image has 2 refiner layers of each kind; at dim 96 diffusers' feed-forward width
    # (int(dim / 3 * 8) = 256) is also ComfyUI's (8/3 dim rounded up to a multiple of 256)
    "tiny": dict(dim=96, heads=3, axes_dims=(8, 12, 12), layers=2, refiner_layers=2, text_dim=32,
                 text_layers=2, vae_channels=(16, 32), latent_channels=16),
}

def tiny_vae(shape):
    """FLUX.1's ae, tiny: Z-Image decodes with FLUX.1's."""
    from ..parts.tiny import tiny_ae

    return tiny_ae(shape)


def build_tiny(folder, preset="tiny", seed=0):
    """Write a random Z-Image diffusers folder; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = write_qwen3_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=shape["text_dim"], intermediate_size=shape["text_dim"] * 2,
        num_hidden_layers=shape["text_layers"], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(
        in_channels=shape["latent_channels"], dim=shape["dim"], n_layers=shape["layers"],
        n_refiner_layers=shape["refiner_layers"], n_heads=shape["heads"], n_kv_heads=shape["heads"],
        cap_feat_dim=shape["text_dim"], axes_dims=list(shape["axes_dims"]), axes_lens=[1536, 512, 512])
    # axes_lens as the real model (and single_files.py): the rope table reaches the family's 1024 px samples
    # Z-Image's scheduler: a static shift of 3 (Tongyi-MAI/Z-Image's scheduler_config.json)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(scheduler=scheduler, vae=tiny_vae(shape), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The same tiny model as the single files ComfyUI users have (models/diffusion_models,
# text_encoders, vae), in the key layouts ComfyUI's own loaders read.

_TO_COMFY = (("attention.to_out.0.", "attention.out."), ("attention.norm_q.", "attention.q_norm."),
             ("attention.norm_k.", "attention.k_norm."), ("all_final_layer.2-1.", "final_layer."),
             ("all_x_embedder.2-1.", "x_embedder."))


def to_comfyui_layout(weights):
    """A ZImageTransformer2DModel state dict in ComfyUI's key layout (comfy/utils.py
    z_image_to_diffusers, inverted): q, k and v fused into attention.qkv."""
    out = {}
    for key, value in weights.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            fused = [weights[key.replace(".to_q.", f".{p}.")] for p in ("to_q", "to_k", "to_v")]
            out[key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(fused)
            continue
        for old, new in _TO_COMFY:
            key = key.replace(old, new)
        out[key] = value
    return out


def write_comfyui_files(folder):
    """The folder's tiny model as ComfyUI's single files in FOLDER/comfyui/: paths {"transformer"
    (bf16), "transformer_fp8" (ComfyUI's scaled fp8), "text_encoder" (qwen_3_4b's layout), "vae"}."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3Model

    from ..parts.tiny import scaled_fp8, write_bfl_vae
    from .single_files import AXES_METADATA_KEY

    out = os.path.join(folder, "comfyui")
    paths = {"transformer": os.path.join(out, "diffusion_models", "tiny-zimage_bf16.safetensors"),
             "transformer_fp8": os.path.join(out, "diffusion_models", "tiny-zimage_fp8_scaled.safetensors"),
             "text_encoder": os.path.join(out, "text_encoders", "tiny-qwen_3_4b.safetensors"),
             "vae": os.path.join(out, "vae", "ae.safetensors")}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    transformer = ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    comfy = {k: v.to(torch.bfloat16).contiguous() for k, v in to_comfyui_layout(transformer.state_dict()).items()}
    meta = {AXES_METADATA_KEY: ",".join(str(a) for a in transformer.config.axes_dims)}
    save_file(comfy, paths["transformer"], metadata=meta)
    save_file(scaled_fp8(comfy, ("layers.", "noise_refiner.", "context_refiner.")), paths["transformer_fp8"],
              metadata=meta)

    text_encoder = Qwen3Model.from_pretrained(os.path.join(folder, "text_encoder"))
    save_file({"model." + k: v.to(torch.bfloat16).contiguous() for k, v in text_encoder.state_dict().items()},
              paths["text_encoder"])
    write_bfl_vae(os.path.join(folder, "vae"), paths["vae"])
    return paths


def write_real_width_files(folder, seed=0):
    """Z-Image-width single files for the load-memory benchmark, random, written tensor by tensor
    (little RAM): a transformer of dim 3840 / 30 heads with one main layer and one refiner of each
    kind (bf16, ComfyUI's layout) and a Qwen3 of Qwen3-4B's widths with one layer."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from ..parts.files import write_streaming
    from ..parts.tiny import random_init

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    paths = {"zimage_transformer": os.path.join(folder, "z_image-real-width.safetensors"),
             "zimage_text_encoder": os.path.join(folder, "qwen_3_4b-1-layer.safetensors")}
    with init_empty_weights():
        transformer = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=2560, intermediate_size=9728,
                                              num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                                              head_dim=128))
    shapes = {k: tuple(v.shape) for k, v in to_comfyui_layout(transformer.state_dict()).items()}
    write_streaming(paths["zimage_transformer"], [(k, s, torch.bfloat16, random_init(s, k)) for k, s in shapes.items()])
    shapes = {"model." + k: tuple(v.shape) for k, v in text_encoder.state_dict().items()}
    write_streaming(paths["zimage_text_encoder"], [(k, s, torch.bfloat16, random_init(s, k)) for k, s in shapes.items()])
    return paths
