"""Stable Diffusion XL: a UNet family (core/families/unet) with two text encoders and the size
conditioning."""
import torch

from ..base import RuleOfThumb
from ..unet.family import UNetFamily, tokens


class SDXL(UNetFamily):
    name = "sdxl"
    title = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    KOHYA_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}
    config_defaults = {"dataset.resolution": [1024], "sample.guidance_scale": 6.0, "sample.sample_steps": 25}
    memory = RuleOfThumb(checkpointing_below_gb=40)  # kohya, OneTrainer presets
    text_encoder_names = ("text_encoder", "text_encoder_2")
    size_conditioning = True

    def encode_batch(self, pipeline, captions, device):
        """(embeddings [B, 77, 2048], pooled [B, 1280]) on `device`, with gradients (a text-encoder
        LoRA trains through it), as diffusers' encode_prompt makes them: both encoders'
        penultimate hidden states side by side (no final layer norm) and the second encoder's
        projected pooled output. SDXL reads the penultimate layer by design, so
        loralab_clip_skip (A1111's count) 1 and 2 both mean it; 3 is the layer before
        (diffusers' clip_skip 1)."""
        encoders = self.encoders_on(pipeline, device)
        tokenizers = (pipeline.tokenizer, pipeline.tokenizer_2)
        layer = -max(2, getattr(pipeline, "loralab_clip_skip", None) or 2)
        outputs = [encoder(tokens(tokenizer, list(captions), device), output_hidden_states=True)
                   for tokenizer, encoder in zip(tokenizers, encoders)]
        return torch.cat([output.hidden_states[layer] for output in outputs], dim=-1), outputs[-1].text_embeds


FAMILY = SDXL()
