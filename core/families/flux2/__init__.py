"""FLUX.2 klein (black-forest-labs/FLUX.2-klein-base-4B / -9B and the step-distilled klein 4B /
9B): what the trainer needs of a model family.

The math follows diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py and its
Flux2KleinPipeline: the VAE's mode is patchified (2x2 into channels) and normalised by the VAE's
batch-norm running statistics, not by a shift and scale; x_t = (1 - s) x0 + s noise, target
noise - x0; the transformer reads the latent as tokens (one per patch, 4D position ids), the
timestep s (timesteps / 1000) and no guidance embedding; prompts are Qwen3's hidden states 9, 18
and 27 stacked along the feature axis, of the whole 512-token padded sequence (no mask)."""
import json
import os

import torch

from ...lora.files import prefixed
from ..base import ModelFamily
from ..loss import loss_mask, weighted_mse
from ..parts import flow  # FLUX.1's noise levels and noisy input: the same flow-matching line
from ..parts import bnb
from ..parts.kohya import kohya_names
from ..preservation import predict_preserving
from .memory import Flux2Memory
from .model import is_distilled_name, load_pipeline

# LoRA on every linear inside the blocks: double-stream attention (image and text q/k/v/out) and
# feed-forwards, single-stream fused qkv+mlp and output. ComfyUI maps exactly these
# (comfy/utils.py flux_to_diffusers); it has no names for the global modulations
# (double_stream_modulation_*, single_stream_modulation) or time_guidance_embed, so those stay frozen.
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
                r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")
DIFFUSERS_PREFIX = "transformer."
MAX_TEXT_TOKENS = 512        # Flux2KleinPipeline's max_sequence_length: captions are padded to it
TEXT_LAYERS = (9, 18, 27)    # Flux2KleinPipeline's text_encoder_out_layers


class Flux2Klein(ModelFamily):
    name = "flux2"
    title = "FLUX.2 klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    single_files = ("transformer_path", "text_encoder_path", "vae_path")
    required_files = single_files
    single_files_text = "its three single files (transformer, Qwen3 text encoder, FLUX.2 VAE) as ComfyUI keeps them"
    LORA_TARGETS = LORA_TARGETS
    KOHYA_METADATA = {"ss_base_model_version": "flux2", "ss_network_module": "networks.lora"}
    SIZE_MULTIPLE = 16  # the VAE's 8 x the 2x2 patches
    default_save_format = "diffusers"
    # Flux2KleinPipeline's defaults for klein base: 1024 px, guidance 4 (true classifier-free
    # guidance against the empty caption) over 50 steps
    config_defaults = {"dataset.resolution": [1024], "sample.guidance_scale": 4.0, "sample.sample_steps": 50}
    memory = Flux2Memory()

    def claims_files(self, model):
        """Files read to tell: a FLUX.2 transformer, or (with no transformer file) the FLUX.2 VAE."""
        from .files import claims

        return claims(model)

    def describe_file(self, tensors):
        from .files import describe_part

        return describe_part(tensors)

    def advice(self, model):
        """klein 4B / 9B (not -base) are step-distilled (model_index.json is_distilled; ComfyUI's
        files say it by name, flux-2-klein-4b against flux-2-klein-base-4b): a LoRA trained on them
        directly breaks the distillation."""
        path, file = model.get("path"), model.get("transformer_path")
        index = os.path.join(os.path.expanduser(str(path or "")), "model_index.json")
        if file:
            distilled, named = is_distilled_name(file), f"{file} (named as ComfyUI names the distilled klein)"
        elif path and os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                distilled, named = json.load(f).get("is_distilled", False), f"{path} (model_index.json is_distilled)"
        else:
            return []
        if not distilled:
            return []
        return [f"model: {named} is a step-distilled FLUX.2 klein: a LoRA trained on it directly breaks the "
                "distillation. Train on FLUX.2 klein base (black-forest-labs/FLUX.2-klein-base-4B or -9B; "
                "ComfyUI's flux-2-klein-base-4b.safetensors) and use the LoRA with the distilled model."]

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        from .tiny import build_tiny, write_comfyui_files

        folder = build_tiny(folder, preset)
        return (list(write_comfyui_files(folder).values()) if comfyui else []) + [folder]

    def load(self, model, quantize="none", comfyui=None):
        """The klein pipeline from `model["path"]` (a diffusers folder) and/or ComfyUI's single
        files (model.transformer_path, text_encoder_path, vae_path)."""
        self.check_quantize(quantize)
        pipeline = load_pipeline(model, comfyui)
        # the blocks' linears in one byte (half for nf4), as its memory model counts them
        bnb.quantize_loaded(pipeline.transformer, quantize)
        return pipeline

    def size_multiple(self, pipeline):
        return pipeline.vae_scale_factor * 2

    def text_length(self, pipeline):
        return MAX_TEXT_TOKENS

    def encoders_to_device(self, pipeline, device):
        pipeline.vae.to(device)
        self._text_encoder_on(pipeline, device)

    @staticmethod
    def _text_encoder_on(pipeline, device):
        if pipeline.text_encoder is None:
            pipeline.register_modules(text_encoder=pipeline.text_encoder_source.load())
        pipeline.text_encoder.to(device)

    def lora_to_diffusers(self, weights):
        """`transformer.` + peft's names: diffusers' Flux2LoraLoaderMixin and ComfyUI (its FLUX
        key map's `transformer.` form, q/k/v as slices of the fused qkv) both map every key."""
        return prefixed(weights, DIFFUSERS_PREFIX)

    def lora_to_kohya(self, model):
        """save.format kohya: lora_down / lora_up / .alpha under `diffusion_model.` with diffusers'
        module names, as Z-Image's (not yet checked against ComfyUI for FLUX.2)."""
        return kohya_names

    @torch.no_grad()
    def encode_prompts(self, pipeline, prompts, device):
        """{prompt: (hidden [512, 3 x Qwen3 width], empty pooled)} on the CPU, by the pipeline's
        own encoder (its chat template with enable_thinking=False, layers 9, 18 and 27)."""
        self._text_encoder_on(pipeline, device)
        encoded = {}
        for prompt in dict.fromkeys(prompts):
            text = pipeline._get_qwen3_prompt_embeds(pipeline.text_encoder, pipeline.tokenizer, [prompt], device=device,
                                                     max_sequence_length=MAX_TEXT_TOKENS,
                                                     hidden_states_layers=TEXT_LAYERS)
            encoded[prompt] = (text[0].cpu(), torch.zeros(0))
        return encoded

    @torch.no_grad()
    def encode_image(self, pipeline, image, device):
        """Normalised latent [4C, h/2, w/2] of one PIL image: the VAE's mode, patchified and
        normalised by the VAE's batch-norm statistics (Flux2KleinPipeline._encode_vae_image)."""
        pixels = pipeline.image_processor.preprocess(image, height=image.height, width=image.width)
        latent = pipeline.vae.encode(pixels.to(device, pipeline.vae.dtype)).latent_dist.mode()
        return normalize(pipeline._patchify_latents(latent), pipeline.vae)[0].float().cpu()

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """Flow-matching MSE of one batch (latents [B,4C,h,w], text [B,512,dim]); plus
        preservation's loss where the batch carries it."""
        latents = batch["latents"]
        batch_size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = flow.sample_sigmas(batch_size, train_config["timestep_type"], num_tokens=height * width,
                                    generator=generator).to(latents.device)
        noisy, target = flow.noisy_latents(latents, noise, sigmas)
        prediction, preservation = predict_preserving(
            model, predict, noisy, {"sigmas": sigmas, "text": batch["text"], "pooled": batch["pooled"]},
            batch, train_config.get("preservation_weight", 0.0))
        return weighted_mse(prediction, target, batch.get("loss_weight"),
                            mask=loss_mask(batch, target)) + preservation

    @torch.no_grad()
    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One image (PIL) per cached text, each from the same seed, by Flux2KleinPipeline:
        classifier-free guidance against the empty caption where guidance_scale > 1 (klein base)."""
        dtype = pipeline.transformer.dtype
        negative = negative_embeds[0][None].to(device, dtype) if negative_embeds is not None else None
        if negative is None:  # the text encoder may be freed: no guidance without the empty caption's
            guidance_scale = 1.0
        images = []
        for text, _ in prompt_embeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            result = pipeline(prompt_embeds=text[None].to(device, dtype), negative_prompt_embeds=negative,
                              guidance_scale=guidance_scale, num_inference_steps=steps, width=width, height=height,
                              generator=generator, output_type="pil")
            images.append(result.images[0])
        return images


def normalize(latents, vae):
    """(patchified latents - the VAE's batch-norm mean) / its std, as the pipeline does."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return (latents - mean) / std


def predict(transformer, noisy, sigmas, text, pooled):
    """The velocity (noise - x0) for noisy patchified latents [B, C, h, w] at noise levels `sigmas`,
    as train_dreambooth_lora_flux2_klein.py calls the transformer: one token per latent position,
    timestep = s, no guidance."""
    from diffusers import Flux2KleinPipeline

    batch, channels, height, width = noisy.shape
    image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(noisy.device)
    text_ids = Flux2KleinPipeline._prepare_text_ids(text).to(noisy.device)
    output = transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy), encoder_hidden_states=text,
                         timestep=sigmas.to(noisy.dtype), img_ids=image_ids, txt_ids=text_ids, guidance=None,
                         return_dict=False)[0]
    return output.permute(0, 2, 1).reshape(batch, channels, height, width)  # the ids are in row order


FAMILY = Flux2Klein()
