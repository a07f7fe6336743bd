"""Z-Image (Tongyi-MAI/Z-Image, Base and Turbo): what the trainer needs of a model family.

The math follows diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py and its
ZImagePipeline: FLUX.1's flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, the ae's
shift and scale), but the transformer reads t = 1 - s and predicts the negated velocity, takes
latents unpacked ([C, 1, h, w] per image, it patches 2x2 itself) and captions of their own length
(Qwen3's second-to-last hidden state of the tokens the attention mask keeps)."""
import os

import numpy
import torch

from ...lora.files import prefixed
from ..base import ModelFamily
from ..parts import bnb
from ..loss import loss_mask, weighted_mse
from ..parts import flow  # FLUX.1's flow-matching line
from ..parts.kohya import kohya_names
from ..preservation import predict_preserving
from .memory import ZImageMemory
from .model import load_pipeline

# LoRA on the attention and feed-forward linears of every block: the main layers and both
# refiners. ComfyUI maps exactly these (comfy/utils.py z_image_to_diffusers: to_q/k/v into its
# fused qkv, to_out.0, feed_forward.w1/w2/w3); the embedders and final layer stay frozen.
LORA_TARGETS = r".*(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"
DIFFUSERS_PREFIX = "transformer."
BLOCK_PREFIXES = ("layers.", "noise_refiner.", "context_refiner.")  # what model.quantize stores

# The chat template of a one-message prompt, as ComfyUI writes it (comfy/text_encoders/z_image.py
# llama_template) and as ZImagePipeline._encode_prompt gets it from Qwen3's chat template with
# enable_thinking=True. Written out because ComfyUI's tokenizer files carry Qwen2.5's template,
# which adds a system message.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length
TEXT_LAYER = -2        # the second-to-last hidden state (diffusers and ComfyUI: layer_idx=-2)


class ZImage(ModelFamily):
    name = "zimage"
    title = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    single_files = ("transformer_path", "text_encoder_path", "vae_path")
    required_files = single_files
    single_files_text = "its three single files (transformer, Qwen3 text encoder, VAE) as ComfyUI keeps them"
    LORA_TARGETS = LORA_TARGETS
    KOHYA_METADATA = {"ss_base_model_version": "zimage", "ss_network_module": "networks.lora"}
    SIZE_MULTIPLE = 16  # the ae's 8 x the transformer's 2x2 patches
    default_save_format = "diffusers"
    # diffusers' train_dreambooth_lora_z_image.py README: 1024 px, lr 1e-4 (the schema's), its
    # scheduler's static shift of 3; Z-Image Base samples with classifier-free guidance (4) over
    # more steps than FLUX.1
    config_defaults = {"dataset.resolution": [1024], "train.timestep_type": "shift",
                       "sample.guidance_scale": 4.0, "sample.sample_steps": 30}
    memory = ZImageMemory()

    def claims_files(self, model):
        """Files read to tell: a Z-Image transformer, or (with no transformer file) a Qwen3 text
        encoder (Qwen-Image's is Qwen2.5-VL, which has no q_norm)."""
        from .single_files import describe

        for key, kind in (("transformer_path", "a Z-Image transformer"), ("text_encoder_path", "a Qwen3 text encoder")):
            path = os.path.expanduser(model.get(key) or "")
            if path and os.path.isfile(path):
                return describe(path).startswith(kind)
        return False

    def describe_file(self, tensors):
        from .single_files import describe_transformer

        return describe_transformer(tensors)

    def advice(self, model):
        """Z-Image Turbo is step-distilled (8 steps, no guidance): a LoRA trained on it directly
        breaks the distillation, as ai-toolkit's and musubi-tuner's users report. A file or folder
        named for Turbo (Tongyi-MAI/Z-Image-Turbo, z_image_turbo_bf16.safetensors) is taken for it:
        the weights do not say which one they are."""
        named = [model.get(key) for key in ("path", "transformer_path") if model.get(key)]
        if not any("turbo" in os.path.basename(os.path.normpath(str(p))).lower() for p in named):
            return []
        return [f"model: {named[0]} looks like Z-Image Turbo, a step-distilled model: a LoRA trained "
                "on it directly breaks the distillation (images need more steps and lose detail after "
                "a few hundred steps). Train on Z-Image (Base, Tongyi-MAI/Z-Image; ComfyUI's "
                "z_image_bf16.safetensors) and use the LoRA with Turbo, or train on Turbo with ostris' "
                "de-distillation adapter (zimage_turbo_training_adapter) merged in, as ai-toolkit does, "
                "and generate without it."]

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        from .tiny import build_tiny, write_comfyui_files

        folder = build_tiny(folder, preset)
        return (list(write_comfyui_files(folder).values()) if comfyui else []) + [folder]

    def load(self, model, quantize="none", comfyui=None):
        """The Z-Image pipeline from `model["path"]` (a diffusers folder) and/or ComfyUI's single
        files (model.transformer_path, text_encoder_path, vae_path)."""
        self.check_quantize(quantize)
        pipeline = load_pipeline(model, comfyui)
        # the blocks' linears in one byte (half for nf4), as its memory model counts them
        bnb.quantize_loaded(pipeline.transformer, quantize, BLOCK_PREFIXES)
        return pipeline

    def size_multiple(self, pipeline):
        """The VAE's downscale times the transformer's 2x2 patches."""
        return pipeline.vae_scale_factor * 2

    def text_length(self, pipeline):
        """Tokens a caption is padded to in the cache (512, or fewer where the tokenizer says so)."""
        longest = getattr(pipeline.tokenizer, "model_max_length", MAX_TEXT_TOKENS) or MAX_TEXT_TOKENS
        return min(MAX_TEXT_TOKENS, longest)

    def encoders_to_device(self, pipeline, device):
        pipeline.vae.to(device)
        self._text_encoder_on(pipeline, device)

    @staticmethod
    def _text_encoder_on(pipeline, device):
        if pipeline.text_encoder is None:
            pipeline.register_modules(text_encoder=pipeline.text_encoder_source.load())
        pipeline.text_encoder.to(device)

    def lora_to_diffusers(self, weights):
        """`transformer.` + peft's names: diffusers' ZImageLoraLoaderMixin and ComfyUI (its Lumina2
        key map's `transformer.` form, to_q/k/v as slices of the fused qkv) both map every key."""
        return prefixed(weights, DIFFUSERS_PREFIX)

    def lora_to_kohya(self, model):
        """save.format kohya: lora_down / lora_up / .alpha under ComfyUI's `diffusion_model.` prefix
        with diffusers' module names (ai-toolkit's layout). ComfyUI maps them (q, k, v into its fused
        qkv) and diffusers converts them; kohya's `lora_unet_` names would reach only ComfyUI's
        fused qkv, which diffusers cannot load."""
        return kohya_names

    def _encode(self, pipeline, prompts, device):
        """(hidden [B, seq, dim] with padding zeroed, mask [B, seq]) of `prompts`."""
        tokens = pipeline.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], padding="max_length",
                                    max_length=self.text_length(pipeline), truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = pipeline.text_encoder(input_ids=ids, attention_mask=mask.bool(),
                                       output_hidden_states=True).hidden_states[TEXT_LAYER]
        return hidden * mask[..., None].to(hidden.dtype), mask.to(hidden.dtype)

    @torch.no_grad()
    def encode_prompts(self, pipeline, prompts, device):
        """{prompt: (Qwen3 hidden states [seq, dim], token mask [seq])} on the CPU. Z-Image has no
        pooled vector: the pair's second tensor is the mask of the caption's real tokens, which
        the transformer reads alone (ZImagePipeline passes `hidden[mask]`). Padded to one length
        so that the cache stacks captions into batches."""
        self._text_encoder_on(pipeline, device)
        encoded = {}
        for prompt in dict.fromkeys(prompts):
            hidden, mask = self._encode(pipeline, [prompt], device)
            encoded[prompt] = (hidden[0].cpu(), mask[0].cpu())
        return encoded

    @torch.no_grad()
    def encode_image(self, pipeline, image, device):
        """Normalised latent [C, h, w] of one PIL image (already at its bucket size): the ae's mode,
        as the reference trainer's latent cache takes it, shifted and scaled by the VAE config."""
        pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(device, pipeline.vae.dtype)
        latent = pipeline.vae.encode(pixels).latent_dist.mode()
        return flow.normalize_latents(latent, pipeline.vae.config)[0].float().cpu()

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """Flow-matching MSE of one batch (latents [B,C,h,w], text [B,seq,dim], its mask as
        `pooled` [B,seq]); plus preservation's loss where the batch carries it."""
        latents = batch["latents"]
        batch_size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = flow.sample_sigmas(batch_size, train_config["timestep_type"],
                                    num_tokens=height * width // 4, generator=generator).to(latents.device)
        noisy, target = flow.noisy_latents(latents, noise, sigmas)
        prediction, preservation = predict_preserving(
            model, predict, noisy, {"sigmas": sigmas, "text": batch["text"], "pooled": batch["pooled"]},
            batch, train_config.get("preservation_weight", 0.0))
        return weighted_mse(prediction, target, batch.get("loss_weight"),
                            mask=loss_mask(batch, target)) + preservation

    @torch.no_grad()
    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One image (PIL) per cached (text, mask) pair, each from the same seed, by ZImagePipeline:
        classifier-free guidance against the empty caption where guidance_scale > 0 (Base; Turbo
        samples at 0)."""
        dtype = pipeline.transformer.dtype
        negative = None
        if guidance_scale > 0 and negative_embeds is not None:
            negative = captions(negative_embeds[0][None].to(device, dtype), negative_embeds[1][None])
        images = []
        for text, mask in prompt_embeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            result = pipeline(prompt_embeds=captions(text[None].to(device, dtype), mask[None]),
                              negative_prompt_embeds=negative, guidance_scale=guidance_scale if negative else 0.0,
                              num_inference_steps=steps, width=width, height=height, generator=generator,
                              output_type="pil")
            images.append(result.images[0])
        return images


def captions(text, mask):
    """Each entry's real tokens: the list of [len_i, dim] the transformer takes."""
    return [hidden[row.to(hidden.device) > 0] for hidden, row in zip(text, mask)]


def predict(transformer, noisy, sigmas, text, pooled):
    """The velocity (noise - x0) for noisy latents [B, C, h, w] at noise levels `sigmas`: the
    transformer reads t = 1 - s and predicts its negation (train_dreambooth_lora_z_image.py)."""
    output = transformer(list(noisy.unsqueeze(2).unbind(0)), (1 - sigmas).to(noisy.dtype),
                         captions(text, pooled), return_dict=False)[0]
    return -torch.stack(output).squeeze(2)


FAMILY = ZImage()
