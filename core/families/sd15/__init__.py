"""Stable Diffusion 1.5: what the trainer needs of a model family (core/families/contract.py).
Shared with SDXL in core/families/unet; here: one CLIP text encoder with clip skip."""
from ..unet import family
from ..unet.family import (LORA_TARGETS, compute_dtype,
                           encode_image, encoders_to_device, free_text_encoders, lora_targets,
                           lora_to_diffusers, remove_lora, size_multiple,
                           text_encoder_lora_targets, text_encoders, to_device, trainable_model,
                           uses_guidance)

name = "sd15"
KOHYA_METADATA = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}


def load(model, quantize="none", comfyui=None):
    """The frozen StableDiffusionPipeline of a model section (diffusers folder or checkpoint)."""
    return family.load(name, model, quantize, comfyui)


def lora_to_kohya(model):
    return family.lora_to_kohya(name, model)


def encode_batch(pipeline, captions, device):
    """(embeddings [B, 77, 768], empty pooled [B, 0]) on `device`, with gradients (a text-encoder
    LoRA trains through it). pipeline.loralab_clip_skip counts as A1111 and kohya do: 1 (or None)
    is CLIP's last layer, 2 the penultimate one, each through the final layer norm (diffusers'
    clip_skip is this minus 1)."""
    (encoder,) = family.encoders_on(pipeline, device)
    skip = getattr(pipeline, "loralab_clip_skip", None) or 1
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers < 5 nests it
    hidden = encoder(family.tokens(pipeline.tokenizer, list(captions), device), output_hidden_states=True)
    embeddings = final_norm(hidden.hidden_states[-skip])
    return embeddings, embeddings.new_zeros(len(embeddings), 0)


def encode_prompts(pipeline, prompts, device):
    """{prompt: (embeddings [77, 768], empty pooled)} on the CPU, for the cache (encode_batch)."""
    return family.encode_prompts(encode_batch, pipeline, prompts, device)


def training_loss(model, batch, generator, train_config, guidance_embeds):
    """The UNet's DDPM loss (unet/family.py), conditioned on the text embeddings only."""
    return family.unet_loss(model, batch, generator, train_config)


def generate(pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
             negative_embeds=None):
    """One PIL image per (text, pooled) pair; pooled is empty for SD1.5 and not passed."""
    return family.generate(pipeline, prompt_embeds, seed, steps, guidance_scale, width, height,
                           device, negative_embeds)


__all__ = ["KOHYA_METADATA", "LORA_TARGETS",
           "compute_dtype", "encode_batch", "encode_image", "encode_prompts", "encoders_to_device",
           "free_text_encoders", "generate", "load", "lora_targets", "lora_to_diffusers", "lora_to_kohya",
           "remove_lora", "size_multiple", "text_encoder_lora_targets", "text_encoders",
           "to_device", "trainable_model", "training_loss", "uses_guidance"]
