"""Qwen-Image (and Qwen-Image 2512): what the trainer needs of a model family
(core/families/base.py), in one place. The math follows diffusers'
examples/dreambooth/train_dreambooth_lora_qwen_image.py: latents normalised by the VAE's
latents_mean / latents_std, packed 2x2, the straight-line flow-matching target noise - x0, the
timestep given as the noise level s in [0, 1], no guidance embedding."""
import math

import numpy
import torch

from ..parts import flow
from ..loss import loss_mask, weighted_mse
from ..base import ModelFamily
from ..preservation import predict_preserving
from .load import load_pipeline
from .memory import QwenImageMemory
from .text import TEXT_LENGTH, padded, trimmed

# LoRA on the attention and MLP linears of every block, as for FLUX.1 (ai-toolkit and
# musubi-tuner's lora_qwen_image train these); the modulations (img_mod, txt_mod) stay frozen
LORA_TARGETS = (r".*transformer_blocks\.\d+\."
                r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                r"|img_mlp\.net\.(0\.proj|2)|txt_mlp\.net\.(0\.proj|2))")
DIFFUSERS_PREFIX = "transformer."
# kohya's names for Qwen-Image are musubi-tuner's (lora_unet_<module with _>)
KOHYA_METADATA = {"ss_base_model_version": "qwen_image", "ss_network_module": "networks.lora_qwen_image"}

# musubi-tuner's default for Qwen-Image (docs/qwen_image.md: --timestep_sampling shift
# --discrete_flow_shift 2.2, "set quite low for Qwen-Image"), the shift of train.timestep_type shift
SHIFT = 2.2
# flux_shift: the resolution shift of Qwen-Image's own scheduler (scheduler_config.json: mu from
# 0.5 at 256 image tokens to 0.9 at 8192), musubi-tuner's qwen_shift
DYNAMIC_SHIFT = dict(base_tokens=256, max_tokens=8192, base_shift=0.5, max_shift=0.9)


def normalize_latents(latents, vae_config):
    mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
    return (latents - mean) / std


def sample_sigmas(batch_size, timestep_type, num_tokens, generator):
    """Noise levels: sigmoid as FLUX.1's; shift at SHIFT; flux_shift at Qwen-Image's own
    resolution shift (DYNAMIC_SHIFT), as its scheduler samples."""
    if timestep_type == "sigmoid":
        return flow.sample_sigmas(batch_size, "sigmoid", num_tokens, generator)
    sigmas = torch.sigmoid(torch.randn(batch_size, generator=generator))
    k = SHIFT if timestep_type == "shift" else math.exp(flow.flux_shift_mu(num_tokens, **DYNAMIC_SHIFT))
    return k * sigmas / (1 + (k - 1) * sigmas)


def predict(transformer, packed_noisy, sigmas, text, mask, height, width):
    """The transformer's velocity for packed noisy latents at noise level sigmas (the pipeline
    passes timestep / 1000, the same s in [0, 1])."""
    text, mask = trimmed(text, mask)
    return transformer(hidden_states=packed_noisy, encoder_hidden_states=text,
                       encoder_hidden_states_mask=mask, timestep=sigmas.to(packed_noisy.dtype),
                       img_shapes=[(1, height // 2, width // 2)] * packed_noisy.shape[0],
                       return_dict=False)[0]


class QwenImage(ModelFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    single_files = ("transformer_path", "text_encoder_path", "vae_path")
    required_files = single_files
    single_files_text = "the three files (transformer, Qwen2.5-VL text encoder, VAE) as ComfyUI keeps them"
    LORA_TARGETS = LORA_TARGETS
    KOHYA_METADATA = KOHYA_METADATA
    SIZE_MULTIPLE = 16  # the VAE's 8 x the 2x2 packing
    # musubi-tuner's shift sampling (at SHIFT), true CFG 4 as QwenImagePipeline's default, 25
    # steps as ai-toolkit samples; resolution [512, 768, 1024], lr 1e-4 and rank 16 are the
    # schema's, as ai-toolkit's train_lora_qwen_image_24gb.yaml has them
    config_defaults = {"train.timestep_type": "shift", "sample.guidance_scale": 4.0, "sample.sample_steps": 25}
    memory = QwenImageMemory()

    def claims_files(self, model):
        from .files import names_qwen_image

        return names_qwen_image(model)

    def describe_file(self, tensors):
        from .files import describe_part

        return describe_part(tensors)

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        from . import tiny

        folder = tiny.build_tiny_qwen_image(folder)
        return (list(tiny.write_comfyui_files(folder).values()) if comfyui else []) + [folder]

    def text_length(self, pipeline):
        return TEXT_LENGTH

    def load(self, model, quantize="none", comfyui=None):
        """The Qwen-Image pipeline from `model["path"]` (a diffusers folder) and/or ComfyUI's files."""
        self.check_quantize(quantize)
        return load_pipeline(model, quantize, comfyui)

    def size_multiple(self, pipeline):
        """Image sides must be a multiple of the VAE's downscale (8) times the 2x2 packing."""
        return pipeline.vae_scale_factor * 2

    def encoders_to_device(self, pipeline, device):
        for part in (pipeline.vae, pipeline.text_encoder):
            if part is not None:
                part.to(device)

    def lora_to_diffusers(self, weights):
        """diffusers' own names, `transformer.` + peft's: both diffusers' QwenImage loader and
        ComfyUI's (comfy/lora.py maps `transformer.<module>` for QwenImage) take them whole."""
        from ...lora.files import prefixed

        return prefixed(weights, DIFFUSERS_PREFIX)

    def lora_to_kohya(self, model):
        """musubi-tuner's names: lora_unet_ + the module with `_`, `.alpha` = rank (the scale is
        already in the weights); ComfyUI maps them through its diffusers names."""
        def convert(weights):
            kohya = {}
            for key, value in weights.items():
                module, _, part = key.rpartition(".lora_")
                stem = "lora_unet_" + module.replace(".", "_")
                kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
                if part.startswith("A"):
                    kohya[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))
            return kohya
        return convert

    @torch.no_grad()
    def encode_prompts(self, pipeline, prompts, device):
        """{prompt: (embeddings [TEXT_LENGTH, dim], mask [TEXT_LENGTH])} on the CPU. Qwen-Image has no
        pooled embedding: the second part is the mask of the padded text. diffusers' encode_prompt
        applies the prompt template and drops its first 34 tokens (drop_idx), reading the last
        hidden state of Qwen2.5-VL, as QwenImagePipeline does."""
        self._text_encoder_on(pipeline, device)
        encoded = {}
        for prompt in dict.fromkeys(prompts):
            embeds, mask = pipeline.encode_prompt(prompt, device=device, max_sequence_length=TEXT_LENGTH)
            text, keep = padded(embeds, mask)
            encoded[prompt] = (text.cpu(), keep)
        return encoded

    def _text_encoder_on(self, pipeline, device):
        if pipeline.text_encoder is None:
            pipeline.register_modules(text_encoder=pipeline.text_encoder_source.load())
        pipeline.text_encoder.to(device)

    @torch.no_grad()
    def encode_image(self, pipeline, image, device):
        """Normalised latent [16, h, w] of one PIL image: the VAE is a video VAE (one frame here), and
        its latents are normalised per channel, (z - latents_mean) / latents_std, as diffusers'
        training script and pipeline do."""
        pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None, :, None].to(device, pipeline.vae.dtype)
        latent = pipeline.vae.encode(pixels).latent_dist.sample()[:, :, 0]
        return normalize_latents(latent, pipeline.vae.config)[0].float().cpu()

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """Flow-matching MSE of one batch (latents [B,16,h,w], text [B,TEXT_LENGTH,dim] and its mask in
        `pooled`), plus preservation's loss where the batch carries it."""
        latents = batch["latents"]
        batch_size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = sample_sigmas(batch_size, train_config["timestep_type"], height * width // 4, generator)
        noisy, target = flow.noisy_latents(latents, noise, sigmas.to(latents.device))

        def velocity(module, packed, sigmas, text, pooled):  # pooled: the text's mask
            return predict(module, packed, sigmas, text, pooled, height, width)

        prediction, preservation = predict_preserving(
            model, velocity, flow.pack(noisy),
            {"sigmas": sigmas.to(latents.device), "text": batch["text"], "pooled": batch["pooled"]},
            batch, train_config.get("preservation_weight", 0.0))
        return weighted_mse(prediction, flow.pack(target), batch.get("loss_weight"),
                            mask=loss_mask(batch, target, flow.pack)) + preservation

    @torch.no_grad()
    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One image (PIL) per cached prompt, each from the same seed, with QwenImagePipeline's own
        sampling: true classifier-free guidance at `guidance_scale` against the empty caption (the
        pipeline's true_cfg_scale; none at 1 or below)."""
        dtype = pipeline.transformer.dtype

        def embeds(prefix, text, mask):  # cut to the prompt's length; the mask given, as encode_prompt makes it
            length = max(1, int(mask.sum().item()))
            return {f"{prefix}prompt_embeds": text[None, :length].to(device, dtype),
                    f"{prefix}prompt_embeds_mask": mask[None, :length].to(device).long()}

        images = []
        for text, mask in prompt_embeds:
            options = embeds("", text, mask)
            if negative_embeds is not None and guidance_scale > 1:
                options.update(embeds("negative_", *negative_embeds))
            generator = torch.Generator("cpu").manual_seed(seed)
            result = pipeline(**options, true_cfg_scale=guidance_scale, num_inference_steps=steps,
                              width=width, height=height, generator=generator, output_type="pil")
            images.append(result.images[0])
        return images


FAMILY = QwenImage()
