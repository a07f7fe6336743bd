"""Stable Diffusion XL: what the trainer needs of a model family (core/families/contract.py).
Shared with SD1.5 in core/families/unet; here: two text encoders and the size conditioning."""
import torch
from accelerate.utils import extract_model_from_parallel

from ..unet import conditioning, family
from ..unet.family import (LORA_TARGETS, compute_dtype,
                           encode_image, encoders_to_device, free_text_encoders, lora_targets,
                           lora_to_diffusers, remove_lora, size_multiple,
                           text_encoder_lora_targets, text_encoders, to_device, trainable_model,
                           uses_guidance)

name = "sdxl"
KOHYA_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}


def load(model, quantize="none", comfyui=None):
    """The frozen StableDiffusionXLPipeline of a model section (diffusers folder or checkpoint)."""
    return family.load(name, model, quantize, comfyui)


def lora_to_kohya(model):
    return family.lora_to_kohya(name, model)


def encode_batch(pipeline, captions, device):
    """(embeddings [B, 77, 2048], pooled [B, 1280]) on `device`, with gradients (a text-encoder
    LoRA trains through it), as diffusers' encode_prompt makes them: both encoders' penultimate
    hidden states side by side (no final layer norm) and the second encoder's projected pooled
    output. SDXL reads the penultimate layer by design, so loralab_clip_skip (A1111's count) 1
    and 2 both mean it; 3 is the layer before (diffusers' clip_skip 1)."""
    encoders = family.encoders_on(pipeline, device)
    tokenizers = (pipeline.tokenizer, pipeline.tokenizer_2)
    layer = -max(2, getattr(pipeline, "loralab_clip_skip", None) or 2)
    outputs = [encoder(family.tokens(tokenizer, list(captions), device), output_hidden_states=True)
               for tokenizer, encoder in zip(tokenizers, encoders)]
    return torch.cat([output.hidden_states[layer] for output in outputs], dim=-1), outputs[-1].text_embeds


def encode_prompts(pipeline, prompts, device):
    """{prompt: (embeddings [77, 2048], pooled [1280])} on the CPU, for the cache (encode_batch)."""
    return family.encode_prompts(encode_batch, pipeline, prompts, device)


def training_loss(model, batch, generator, train_config, guidance_embeds):
    """The UNet's DDPM loss (unet/family.py), conditioned on the pooled text embedding and each
    image's size and crop (conditioning.py); the target size is the latent's times the VAE's
    downscale (8)."""
    latents = batch["latents"]
    scale = extract_model_from_parallel(model).loralab_vae_scale_factor
    target_size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
    time_ids = conditioning.add_time_ids(batch["original_size"], batch["crop_top_left"], target_size)
    return family.unet_loss(model, batch, generator, train_config, time_ids.to(latents.device))


def generate(pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
             negative_embeds=None):
    """One PIL image per (text, pooled) pair; the pipeline conditions on original = target size."""
    return family.generate(pipeline, prompt_embeds, seed, steps, guidance_scale, width, height,
                           device, negative_embeds, pooled=True)


__all__ = ["KOHYA_METADATA", "LORA_TARGETS",
           "compute_dtype", "encode_batch", "encode_image", "encode_prompts", "encoders_to_device",
           "free_text_encoders", "generate", "load", "lora_targets", "lora_to_diffusers", "lora_to_kohya",
           "remove_lora", "size_multiple", "text_encoder_lora_targets", "text_encoders",
           "to_device", "trainable_model", "training_loss", "uses_guidance"]
