"""What SD1.5 and SDXL share as model families (core/families/base.py): a UNet trained with
DDPM noise (noise.py), a VAE with a scaling factor, CLIP text encoders that are freed after
encoding. core/families/sd15 and sdxl subclass UNetFamily with their data, prompt encoding and
(SDXL) size conditioning."""
import contextlib
import os

import numpy
import torch
from accelerate.utils import extract_model_from_parallel

from ..base import ModelFamily
from ..loss import loss_mask, weighted_mse
from ..preservation import predict_preserving
from . import noise


# Module names inside the UNet's transformer blocks, e.g.
# down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k; resnets hold the 3x3 convolutions.
ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
FEED_FORWARD = r"ff\.net\.(0\.proj|2)"
CONVOLUTIONS = r"resnets\.\d+\.(conv1|conv2)"


def _in_transformer_blocks(parts):
    return rf".*attentions\.\d+\.transformer_blocks\.\d+\.({'|'.join(parts)})"


# The text-encoder LoRA: CLIP's attention and MLP linears in every layer, as kohya's (lora_te_)
TEXT_ENCODER_TARGETS = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


class UNetFamily(ModelFamily):
    """A Stable Diffusion UNet family; a subclass sets the data and encode_batch."""
    pipeline_classes = ()
    single_files = ("checkpoint_path", "vae_path")
    required_files = ("checkpoint_path",)
    single_files_text = "a single-file checkpoint as ComfyUI keeps it in models/checkpoints"
    LORA_TARGETS = _in_transformer_blocks([ATTENTION])  # self- and cross-attention only
    default_save_format = "kohya"
    text_encoder_lora = True
    text_encoder_names = ("text_encoder",)  # pipeline attributes, in the pipeline's order
    size_conditioning = False               # SDXL: original size, crop and target size

    def claims_files(self, model):
        """A checkpoint whose keys are this family's (files.detect); ValueError naming the file
        when it is no SD checkpoint at all."""
        checkpoint = model.get("checkpoint_path")
        if not checkpoint:
            return False
        from .files import detect

        return detect(os.path.expanduser(checkpoint))["family"] == self.name

    def describe_file(self, tensors):
        from .files import describe_checkpoint

        return describe_checkpoint(tensors)

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        from .tiny import build_tiny, write_single_file

        folder = build_tiny(self.name, folder)
        written = [write_single_file(folder, single_file) or single_file] if single_file else []
        return written + [folder]

    def lora_targets(self, network):
        """peft LoraConfig arguments for the `network` section: attention, plus the feed-forward
        linears with `feed_forward`, plus the resnets' 3x3 convolutions (LoCon) at their own rank
        `conv` and alpha `conv_alpha` (or `conv`) when `conv` > 0."""
        regex = _in_transformer_blocks([ATTENTION, FEED_FORWARD] if network.get("feed_forward") else [ATTENTION])
        conv_rank = network.get("conv", 0) or 0
        if conv_rank <= 0:
            return {"target_modules": regex}
        return {"target_modules": rf"({regex}|.*{CONVOLUTIONS})",
                "rank_pattern": {CONVOLUTIONS: conv_rank},
                "alpha_pattern": {CONVOLUTIONS: network.get("conv_alpha") or conv_rank}}

    def load(self, model, quantize="none", comfyui=None):
        """The frozen pipeline from a model section: a diffusers folder or a checkpoint (load.py)."""
        from .load import load_pipeline

        if quantize not in ("none", None):
            raise ValueError(f"model.quantize {quantize!r} is not available for {self.name} yet: use none")
        pipeline = load_pipeline(self.name, model, comfyui)
        _remember_for_training(pipeline)
        return pipeline

    def lora_to_diffusers(self, weights):
        """diffusers' attention-processor names, which diffusers and ComfyUI both load (keys.py)."""
        from .keys import lora_to_diffusers

        return lora_to_diffusers(weights)

    def lora_to_kohya(self, model):
        """A function mapping the UNet's peft LoRA weights to kohya's names (lora_unet_...); SDXL's
        LDM names depend on the UNet's layout, so its config goes along."""
        from .keys import lora_to_kohya

        config = extract_model_from_parallel(model).config
        return lambda weights: lora_to_kohya(weights, self.name, config)

    def trainable_model(self, pipeline):
        _remember_for_training(pipeline)  # also for a pipeline that did not come through load
        return pipeline.unet

    def compute_dtype(self, pipeline):
        return pipeline.unet.dtype

    def _text_encoder_names(self, pipeline):
        return [name for name in self.text_encoder_names if name in pipeline.components]

    def encoders_to_device(self, pipeline, device):
        """The VAE and text encoders, for caching; the UNet stays where it is."""
        for name in ["vae", *self._text_encoder_names(pipeline)]:
            module = getattr(pipeline, name)
            if module is not None:
                module.to(device)

    def to_device(self, pipeline, device):
        pipeline.vae.to(device)
        pipeline.unet.to(device)

    def offload_blocks(self, model):
        """The resnets and attention transformer blocks in forward order: what diffusers
        checkpoints one by one (a whole down or up block is never recomputed as one)."""
        blocks = []
        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
            resnets = list(block.resnets)
            attentions = [list(a.transformer_blocks) for a in getattr(block, "attentions", None) or ()]
            if block is model.mid_block:  # resnet, then (attention, resnet) pairs; diffusers never
                resnets.pop(0)                # checkpoints that first resnet: it stays on the device
                for attention, resnet in zip(attentions, resnets):
                    blocks += [*attention, resnet]
            else:  # (resnet, attention) pairs
                for index, resnet in enumerate(resnets):
                    blocks += [resnet, *(attentions[index] if index < len(attentions) else ())]
        return blocks

    def free_text_encoders(self, pipeline):
        """Dropped after encoding: sampling reads cached embeddings; text_encoders loads them again."""
        pipeline.register_modules(**{name: None for name in self._text_encoder_names(pipeline)})

    def text_encoders(self, pipeline):
        """{"text_encoder": CLIP, ...}: the pipeline's text encoders, loaded again if they were
        freed; a text-encoder LoRA's weights take these names as prefixes."""
        names = self._text_encoder_names(pipeline)
        if any(getattr(pipeline, name) is None for name in names):
            from .load import reload_text_encoders

            reload_text_encoders(pipeline)
        return {name: getattr(pipeline, name) for name in names}

    def text_encoder_lora_targets(self, network):
        return {"target_modules": TEXT_ENCODER_TARGETS}

    def encoders_on(self, pipeline, device):
        """The text encoders (as text_encoders) on `device`, in the pipeline's order."""
        return [encoder.to(device) for encoder in self.text_encoders(pipeline).values()]

    def encode_prompts(self, pipeline, prompts, device):
        """{prompt: (text, pooled)} on the CPU, one prompt at a time through encode_batch, without
        gradients: the cache holds what training with a frozen text encoder would compute."""
        with torch.no_grad():
            return {prompt: tuple(part[0].cpu() for part in self.encode_batch(pipeline, [prompt], device))
                    for prompt in dict.fromkeys(prompts)}

    def remove_lora(self, pipeline):
        """The LoRA layers off the UNet and off any text encoder that carries one."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        if getattr(pipeline.unet, "peft_config", None):
            pipeline.unet.unload_lora()
        for name in self._text_encoder_names(pipeline):
            encoder = getattr(pipeline, name)
            if getattr(encoder, "peft_config", None):
                recurse_remove_peft_layers(encoder)  # what diffusers' unload_lora_weights does to them
                del encoder.peft_config

    @torch.no_grad()
    def encode_image(self, pipeline, image, device):
        """The latent [4, h/8, w/8] of one PIL image (already at its bucket size) times the VAE's
        scaling factor, float32 on the CPU."""
        pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 127.5 - 1.0).permute(2, 0, 1)
        with _vae_for_encoding(pipeline.vae) as vae:
            latent = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.sample()
        return (latent[0] * pipeline.vae.config.scaling_factor).float().cpu()

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """The (min-SNR weighted) MSE of one batch: noise and timesteps from `generator`, the noisy
        latents, the UNet's prediction against the epsilon or v target of its scheduler; plus
        preservation's loss where the batch carries it (families/preservation.py). With
        size_conditioning (SDXL) the UNet is also told each image's size and crop
        (conditioning.py); the target size is the latent's times the VAE's downscale."""
        unet = extract_model_from_parallel(model)
        config = unet.loralab_noise_config
        prediction_type = config.get("prediction_type") or "epsilon"
        cumulative = noise.alphas_cumprod(config, train_config.get("zero_terminal_snr", False))
        latents = batch["latents"]
        clean = latents.float()  # the noise math in float32, whatever the compute dtype
        drawn, timesteps = noise.draw(
            clean.shape, generator, len(cumulative), train_config.get("noise_offset", 0.0),
            train_config.get("timestep_min", 0), train_config.get("timestep_max", 1000))
        drawn, timesteps = drawn.to(latents.device), timesteps.to(latents.device)
        noisy = noise.noisy_latents(clean, drawn, cumulative, timesteps)
        per_entry = {"timesteps": timesteps, "text": batch["text"], "pooled": batch["pooled"]}
        if self.size_conditioning:
            from .conditioning import add_time_ids

            scale = unet.loralab_vae_scale_factor
            target_size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
            time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], target_size)
            per_entry["time_ids"] = time_ids.to(latents.device)
        prediction, preservation = predict_preserving(model, _unet_prediction, noisy.to(latents.dtype), per_entry,
                                                      batch, train_config.get("preservation_weight", 0.0))
        target = noise.target(clean, drawn, cumulative, timesteps, prediction_type)
        gamma = train_config.get("min_snr_gamma")
        weights = noise.min_snr_weights(noise.snr(cumulative, timesteps), gamma, prediction_type) if gamma else None
        return weighted_mse(prediction, target, weights, batch.get("loss_weight"),
                            mask=loss_mask(batch, target)) + preservation

    @torch.no_grad()
    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One PIL image per (text, pooled) pair from diffusers' own pipeline, each from the same
        seed, with classifier-free guidance against `negative_embeds` (zeros when None: the text
        encoders are freed while sampling, so nothing is encoded here). With size_conditioning
        (SDXL) the pooled embeddings are passed too, and the pipeline conditions on original =
        target size."""
        dtype = pipeline.unet.dtype
        images = []
        with _euler_scheduler(pipeline):
            for text, pool in prompt_embeds:
                negative_text, negative_pool = negative_embeds or (torch.zeros_like(text), torch.zeros_like(pool))
                embeds = {"prompt_embeds": text[None].to(device, dtype),
                          "negative_prompt_embeds": negative_text[None].to(device, dtype)}
                if self.size_conditioning:
                    embeds.update(pooled_prompt_embeds=pool[None].to(device, dtype),
                                  negative_pooled_prompt_embeds=negative_pool[None].to(device, dtype))
                result = pipeline(**embeds, num_inference_steps=steps, guidance_scale=guidance_scale,
                                  width=width, height=height,
                                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
                images.append(result.images[0])
        return images


def _remember_for_training(pipeline):
    """training_loss is given the UNet only, so the UNet carries what it needs of the pipeline:
    its scheduler's config (betas, prediction type, zero-SNR rescale) and the VAE's downscale
    (SDXL's target size). generate swaps the scheduler only while it samples."""
    pipeline.unet.loralab_noise_config = dict(pipeline.scheduler.config)
    pipeline.unet.loralab_vae_scale_factor = pipeline.vae_scale_factor


def tokens(tokenizer, prompts, device):
    """Token ids [B, 77] of a list of prompts, padded and truncated as the pipelines'
    encode_prompt does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


@contextlib.contextmanager
def _vae_for_encoding(vae):
    """SDXL's VAE overflows in float16 (its config says force_upcast): it encodes in float32."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(torch.float16)


def _unet_prediction(module, noisy, timesteps, text, pooled, time_ids=None):
    """The UNet's output; SDXL (time_ids given) is also conditioned on the pooled text."""
    added = None if time_ids is None else {"text_embeds": pooled, "time_ids": time_ids}
    return module(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


@contextlib.contextmanager
def _euler_scheduler(pipeline):
    """The pipeline samples with Euler (its scheduler's config: betas, prediction type) for the
    duration, then gets its own scheduler back. A LoRA trained with zero_terminal_snr samples
    with the same scheduler (no trailing spacing or rescale here)."""
    from diffusers import EulerDiscreteScheduler

    original = pipeline.scheduler
    pipeline.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        yield
    finally:
        pipeline.scheduler = original
