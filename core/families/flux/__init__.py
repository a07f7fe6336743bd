"""FLUX.1: what the trainer needs of a model family (core/families/base.py), in one place."""
import os

import numpy
import torch

from ...lora.files import module_tensors, only_lora_pairs, prefixed
from ..base import ModelFamily
from ..loss import loss_mask, weighted_mse
from ..preservation import predict_preserving
from ..parts import flow
from . import keys
from .memory import FluxMemory
from .model import load_pipeline

# LoRA on the attention and MLP linears of the double (transformer_blocks) and single
# (single_transformer_blocks) blocks; the final proj_out and the embedders stay frozen.
LORA_TARGETS = (r".*(transformer_blocks|single_transformer_blocks)\.\d+\."
                r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")

DIFFUSERS_PREFIX = "transformer."


class Flux(ModelFamily):
    name = "flux"
    title = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    single_files = ("transformer_path", "clip_l_path", "t5_path", "vae_path")
    required_files = single_files
    single_files_text = "all four single files (transformer, CLIP-L, T5, VAE) as ComfyUI keeps them"
    LORA_TARGETS = LORA_TARGETS
    KOHYA_METADATA = {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
    SIZE_MULTIPLE = 16  # the VAE's 8 x the 2x2 packing
    default_save_format = "diffusers"
    memory = FluxMemory()
    tiny_presets = ("tiny", "small")

    def claims_files(self, model):
        """CLIP-L and T5 files are FLUX.1's alone; a transformer file is read to tell."""
        if model.get("clip_l_path") or model.get("t5_path"):
            return True
        path = model.get("transformer_path")
        if not path or not os.path.isfile(os.path.expanduser(path)):
            return False
        from .file_layout import identify

        try:
            return identify(os.path.expanduser(path)) == "flux_transformer"
        except (OSError, ValueError):
            return False

    def describe_file(self, tensors):
        from .file_layout import describe_file

        return describe_file(tensors)

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        from . import tiny

        folder = tiny.build_tiny_flux(folder, preset=preset)
        written = []
        if single_file:
            tiny.write_single_file(folder, single_file)
        if comfyui:
            written += list(tiny.write_comfyui_files(folder).values())
        return written + [folder]

    def load(self, model, quantize="none", comfyui=None):
        """The FLUX.1 pipeline from `model["path"]` (a diffusers folder) and/or its single files."""
        return load_pipeline(model["path"], model.get("transformer_path"), model["dtype"], quantize,
                             clip_l_path=model.get("clip_l_path"), t5_path=model.get("t5_path"),
                             vae_path=model.get("vae_path"), comfyui=comfyui)

    def lora_targets(self, network):
        """The attention and MLP linears of every block (FLUX always trains its MLPs; the SD-only
        feed_forward and conv settings do not apply)."""
        return {"target_modules": LORA_TARGETS}

    def size_multiple(self, pipeline):
        """Image sides must be a multiple of the VAE's downscale times the 2x2 packing."""
        return pipeline.vae_scale_factor * 2

    def text_length(self, pipeline):
        # FLUX.1-dev (guidance-distilled) reads 512 T5 tokens; schnell was trained with 256. A model
        # whose T5 tokenizer says fewer (the shipped shapes model: 64) reads that many.
        longest = 512 if pipeline.transformer.config.guidance_embeds else 256
        tokenizer = getattr(pipeline, "tokenizer_2", None)
        return min(longest, getattr(tokenizer, "model_max_length", longest) or longest)

    def trainable_model(self, pipeline):
        return pipeline.transformer

    def uses_guidance(self, pipeline):
        return bool(pipeline.transformer.config.guidance_embeds)

    def encoders_to_device(self, pipeline, device):
        """The VAE and text encoders, for caching; the transformer stays where it is, so T5-XXL
        (about 9 GB in bf16) and the transformer are never on the accelerator together."""
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipeline, name)
            if module is not None:
                module.to(device)

    def to_device(self, pipeline, device):
        """The VAE and the transformer, for training and sampling. A bitsandbytes-quantized
        transformer is placed by its loader and cannot be moved, so it stays where it is."""
        pipeline.vae.to(device)
        transformer = pipeline.transformer
        if not (getattr(transformer, "is_quantized", False) or getattr(transformer, "hf_quantizer", None)):
            transformer.to(device)

    def free_text_encoders(self, pipeline):
        """After encoding, T5 (about 9 GB in bf16 for FLUX.1) and CLIP are dropped, not parked in
        RAM: sampling reads cached embeddings, and encode_prompts loads them again when asked."""
        pipeline.register_modules(text_encoder=None, text_encoder_2=None)

    def remove_lora(self, pipeline):
        """Every peft layer taken out (not only its adapters), so the transformer's modules are the
        ones it was loaded with."""
        transformer = pipeline.transformer
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()

    def lora_to_diffusers(self, weights):
        """diffusers' own names: `transformer.` + peft's (ComfyUI maps them for FLUX)."""
        if only_lora_pairs(weights):
            return prefixed(weights, DIFFUSERS_PREFIX)
        return module_tensors(weights, lambda module: DIFFUSERS_PREFIX + module, lycoris_names=False)

    def lora_to_kohya(self, model):
        """A function mapping the transformer's LoRA weights to kohya names (lora_unet_double_...)."""
        config = model.config
        return lambda weights: keys.lora_to_kohya(weights, config.num_layers, config.num_single_layers)

    @torch.no_grad()
    def encode_prompts(self, pipeline, prompts, device):
        """{prompt: (t5 embeddings [seq, dim], pooled CLIP [dim])} on the CPU, for the cache. The
        text encoders are loaded again if they were freed; the caller frees them when done."""
        if pipeline.text_encoder is None or pipeline.text_encoder_2 is None:
            clip, t5 = pipeline.text_encoder_source.load()
            pipeline.register_modules(text_encoder=clip, text_encoder_2=t5)
        pipeline.text_encoder.to(device)
        pipeline.text_encoder_2.to(device)
        encoded = {}
        for prompt in dict.fromkeys(prompts):
            embeds, pooled, _ = pipeline.encode_prompt(prompt, prompt_2=None, device=device,
                                                       max_sequence_length=self.text_length(pipeline))
            encoded[prompt] = (embeds[0].cpu(), pooled[0].cpu())
        return encoded

    @torch.no_grad()
    def encode_image(self, pipeline, image, device):
        """Normalised latent [C, h, w] of one PIL image (already at its bucket size)."""
        pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(device, pipeline.vae.dtype)
        latent = pipeline.vae.encode(pixels).latent_dist.sample()
        return flow.normalize_latents(latent, pipeline.vae.config)[0].float().cpu()

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """Flow-matching MSE of one batch: batch holds latents [B,C,h,w], text [B,seq,dim] and
        pooled [B,dim] on the training device; plus preservation's loss where the batch carries
        it (families/preservation.py)."""
        latents = batch["latents"]
        batch_size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = flow.sample_sigmas(batch_size, train_config["timestep_type"],
                                    num_tokens=height * width // 4, generator=generator)
        sigmas = sigmas.to(latents.device)
        noisy, target = flow.noisy_latents(latents, noise, sigmas)
        guidance = train_config["guidance"] if guidance_embeds else None

        def velocity(module, packed, sigmas, text, pooled):
            return self.predict(module, packed, sigmas, text, pooled, height, width, guidance)

        prediction, preservation = predict_preserving(
            model, velocity, flow.pack(noisy), {"sigmas": sigmas, "text": batch["text"], "pooled": batch["pooled"]},
            batch, train_config.get("preservation_weight", 0.0))
        return weighted_mse(prediction, flow.pack(target), batch.get("loss_weight"),
                            mask=loss_mask(batch, target, flow.pack)) + preservation

    @staticmethod
    def predict(transformer, packed_noisy, sigmas, text, pooled, height, width, guidance):
        """The transformer's velocity for packed noisy latents at noise level sigmas."""
        device, dtype = packed_noisy.device, packed_noisy.dtype
        guidance_tensor = None
        if guidance is not None:
            guidance_tensor = torch.full((packed_noisy.shape[0],), float(guidance), device=device)
        return transformer(
            hidden_states=packed_noisy, timestep=sigmas.to(dtype), guidance=guidance_tensor,
            pooled_projections=pooled, encoder_hidden_states=text,
            txt_ids=flow.text_ids(text.shape[1], device, dtype),
            img_ids=flow.image_ids(height, width, device, dtype), return_dict=False)[0]

    @torch.no_grad()
    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One image (PIL) per cached prompt embedding pair, each from the same seed. FLUX.1 is
        guidance-distilled (no negative prompt), so negative_embeds is not used."""
        images = []
        for text, pooled in prompt_embeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            result = pipeline(prompt_embeds=text[None].to(device, pipeline.transformer.dtype),
                              pooled_prompt_embeds=pooled[None].to(device, pipeline.transformer.dtype),
                              num_inference_steps=steps, guidance_scale=guidance_scale,
                              width=width, height=height, generator=generator, output_type="pil")
            images.append(result.images[0])
        return images


FAMILY = Flux()
