"""Stable Diffusion 1.5: a UNet family (core/families/unet) with one CLIP text encoder and clip skip."""
from ..base import RuleOfThumb
from ..unet.family import UNetFamily, tokens


class SD15(UNetFamily):
    name = "sd15"
    title = "SD1.5"
    pipeline_classes = ("StableDiffusionPipeline",)
    KOHYA_METADATA = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
    config_defaults = {"dataset.resolution": [512], "sample.guidance_scale": 7.0, "sample.sample_steps": 25,
                       "sample.width": 512, "sample.height": 512}
    memory = RuleOfThumb(checkpointing_below_gb=12)  # kohya, OneTrainer presets

    def encode_batch(self, pipeline, captions, device):
        """(embeddings [B, 77, 768], empty pooled [B, 0]) on `device`, with gradients (a
        text-encoder LoRA trains through it). pipeline.loralab_clip_skip counts as A1111 and kohya
        do: 1 (or None) is CLIP's last layer, 2 the penultimate one, each through the final layer
        norm (diffusers' clip_skip is this minus 1)."""
        (encoder,) = self.encoders_on(pipeline, device)
        skip = getattr(pipeline, "loralab_clip_skip", None) or 1
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers < 5 nests it
        hidden = encoder(tokens(pipeline.tokenizer, list(captions), device), output_hidden_states=True)
        embeddings = final_norm(hidden.hidden_states[-skip])
        return embeddings, embeddings.new_zeros(len(embeddings), 0)


FAMILY = SD15()
