"""What the trainer, the sampler and the nodes need of a model family, written down. A family is
a module (core/families/<name>/__init__.py) that satisfies this Protocol; FLUX.1 does, checked in
tests/test_family_contract.py, as do SDXL and SD1.5."""
from typing import Protocol, runtime_checkable


@runtime_checkable
class ModelFamily(Protocol):
    name: str
    LORA_TARGETS: str  # regex of the module names that get a LoRA by default
    KOHYA_METADATA: dict  # ss_base_model_version and ss_network_module of a kohya-format file

    def load(self, model, quantize="none", comfyui=None):
        """The pipeline from local files only, every part frozen. `model` is the resolved
        `model` config section (its `path` already a local folder or None, and the family's
        single files); `quantize` is already resolved from "auto"; `comfyui` is ComfyUI's
        folder, if known (core/ never imports ComfyUI: the node layer passes it)."""

    def size_multiple(self, pipeline) -> int:
        """Image sides must be a multiple of this (the VAE's downscale times any packing)."""

    def trainable_model(self, pipeline):
        """The module the LoRA goes on (FLUX: the transformer)."""

    def compute_dtype(self, pipeline):
        """The dtype batches are cast to for the trainable model."""

    def uses_guidance(self, pipeline) -> bool:
        """Whether the model takes a guidance embedding while training (FLUX.1-dev)."""

    def encoders_to_device(self, pipeline, device):
        """The VAE and text encoders on `device` for caching; the trainable model stays put."""

    def to_device(self, pipeline, device):
        """The VAE and the trainable model on `device`, for training and sampling."""

    def free_text_encoders(self, pipeline):
        """Drops the text encoders after encoding; encode_prompts loads them again."""

    def remove_lora(self, pipeline):
        """Takes every LoRA layer off the trainable model."""

    def lora_targets(self, network) -> dict:
        """peft LoraConfig arguments (target_modules, and rank_pattern/alpha_pattern where some
        modules get their own rank) for the `network` config section."""

    def lora_to_diffusers(self, weights) -> dict:
        """The diffusers-format file's keys for peft LoRA weights (alpha baked in): names that
        diffusers' load_lora_weights and ComfyUI's LoRA loader both map in full."""

    def lora_to_kohya(self, model):
        """A function mapping the LoRA's weights to kohya key names."""

    def encode_prompts(self, pipeline, prompts, device) -> dict:
        """{prompt: (embeddings, pooled)} on the CPU, for the cache."""

    def text_encoders(self, pipeline) -> dict:
        """{name: module} of the text encoders a text-encoder LoRA goes on (network.text_encoder),
        loaded again if they were freed; `name` is the pipeline attribute, and its weights take
        the prefix `<name>.` in the LoRA file, as diffusers' save_lora_weights writes them. A
        family that does not offer a text-encoder LoRA raises ValueError."""

    def text_encoder_lora_targets(self, network) -> dict:
        """peft LoraConfig arguments of the text-encoder LoRA for the `network` section."""

    def encode_batch(self, pipeline, captions, device):
        """(text [B,seq,dim], pooled [B,dim]) of `captions` on `device`, with gradients through
        the text encoders (and their LoRA): for training them. With no LoRA (or one at zero) the
        values are encode_prompts'."""

    def encode_image(self, pipeline, image, device):
        """The normalised latent of one PIL image at its bucket size, on the CPU."""

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        """The loss of one batch: noise, target, loss. `batch` holds, on the device, latents
        [B,C,h,w], text [B,seq,dim], pooled [B,dim] (dim may be 0), original_size [B,2] (height,
        width of the source image) and crop_top_left [B,2] (of the centre crop in the resized
        image); all randomness comes from `generator`. With train.preservation_class it also
        holds preservation_text / preservation_pooled (the captions with the trigger replaced by
        the class word, encoded as the captions are), preservation_base_text / _pooled (the same
        by the text encoders without their LoRA) and preservation_mask [B] (1 where the caption
        held the trigger): the loss then adds train_config["preservation_weight"] times the
        drift of those entries' prediction from the base model's on the same noisy input
        (core/families/preservation.py's predict_preserving, which every family uses). With
        dataset.regularization_folder it holds loss_weight [B], each entry's weight in the loss
        (core/families/loss.py's weighted_mse)."""

    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One PIL image per cached (text, pooled) pair, each from the same seed; a family with
        classifier-free guidance uses `negative_embeds` (the empty caption's pair)."""
