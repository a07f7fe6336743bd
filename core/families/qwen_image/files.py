"""Qwen-Image from ComfyUI's files (models/diffusion_models qwen_image_*.safetensors,
text_encoders qwen_2.5_vl_7b*.safetensors, vae qwen_image_vae.safetensors): each part built
empty on the meta device and filled tensor by tensor, as FLUX.1's single files are."""


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def tokenizer(comfyui=None, model_files=()):
    from transformers import Qwen2Tokenizer

    from .text import find_tokenizer

    return Qwen2Tokenizer.from_pretrained(find_tokenizer(comfyui, [f for f in model_files if f]),
                                          local_files_only=True)


def names_qwen_image(model_cfg):
    """Whether a model section's ComfyUI files are Qwen-Image's (model.family auto)."""
    return False
