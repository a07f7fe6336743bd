"""What the trainer, the sampler, the config loader, the coach and the nodes need of a model family,
written down once: `ModelFamily`, the base class every family subclasses. A family is one folder
core/families/<name>/ whose __init__.py exports `FAMILY`, an instance of its subclass; what it
knows (its files, its defaults, its memory model, its math) lives there and nowhere else.

Data members have defaults where the families agree; methods without one raise
NotImplementedError. tests/test_family_contract.py holds every family to this class."""
from .. import UserError


class ModelError(UserError, ValueError):
    """A model that cannot be loaded; the message names the setting and what to do."""


class MemoryModel:
    """What core/memory needs of a family to estimate a training step's peak memory before any
    model loads. The generic parts (LoRA weights, gradients and optimizer states, quantized bytes,
    headroom, what to lower in which order) are core/memory's; a family gives its shapes.

    `shape` is a dict the family fills and reads back; core/memory reads only these keys of it:
    "parameters" (the trainable model's weights), "quantizable" (those stored quantized by
    model.quantize: every family's are its blocks' linears), "hidden" (the blocks' width) and, for
    the default block_parameters, "num_layers" and "num_single_layers". A family without a
    measured model uses RuleOfThumb instead."""

    estimated = True
    quantize_modes = ("none",)       # model.quantize modes it offers, least memory-saving first
    default_source = ""              # the model whose shapes are used when no file is read
    other_sizes = ()                 # model.path names of its other released sizes, for the plan

    def shape(self, model):
        """(shape dict, where it came from) of the trainable model, from the resolved `model`
        section's files (a local folder or single file), or the family's reference model when
        there is none (the plan runs before anything is downloaded)."""
        raise NotImplementedError

    def lora_parameters(self, shape, network):
        """Parameters of the LoRA the `network` section puts on this model."""
        raise NotImplementedError

    def activation_bytes(self, shape, resolution, batch_size, checkpointing, train_dtype, model_dtype,
                         recomputed=0):
        """Peak activation bytes of one forward + backward at this square resolution. With
        checkpointing every block is recomputed in backward; without, `recomputed` blocks are
        (those train.offload_blocks keeps off the device: they keep only their input)."""
        raise NotImplementedError

    def block_parameters(self, shape):
        """Weights of each block of the trainable model, in forward order: what
        train.offload_blocks moves off the device. By default the quantizable weights split evenly
        over num_layers + num_single_layers blocks (the families whose blocks are all alike)."""
        count = shape["num_layers"] + shape.get("num_single_layers", 0)
        return [shape["quantizable"] / count] * count

    def tokens(self, shape, resolution):
        """Tokens (image and text) the blocks read for one image of this square resolution."""
        raise NotImplementedError

    def flops_per_token(self, shape, tokens):
        """Forward FLOPs per token: 2 per weight, and attention's 4 x tokens x hidden per block
        (scores and weighted sum over `tokens` keys)."""
        return 2 * shape["parameters"] + 4 * tokens * shape["hidden"] * len(self.block_parameters(shape))

    def transient_bytes(self, shape, quantize):
        """Dequantized copies alive during a step (one layer's at a time) for this quantize mode."""
        return 0

    def resident_parameters(self, shape):
        """Frozen parameters on the device during a step besides the trainable model (the VAE)."""
        return 0


class RuleOfThumb(MemoryModel):
    """No measured estimate: the model is not quantized, and "auto" turns gradient checkpointing
    on for CUDA GPUs under `checkpointing_below_gb` (on every CUDA GPU when None), a rule of
    thumb from common practice."""
    estimated = False

    def __init__(self, checkpointing_below_gb=None):
        self.checkpointing_below_gb = checkpointing_below_gb


class ModelFamily:
    # -- what the family is, as data -------------------------------------------------------------
    name = ""               # as in model.family
    title = ""              # as users know it, in messages ("FLUX.1")
    pipeline_classes = ()   # model_index.json `_class_name`s of its diffusers folders (auto)
    single_files = ()       # model-section keys of the single files it loads (ComfyUI's files)
    required_files = ()     # with all of these given, no diffusers folder is needed
    single_files_text = ""  # what `required_files` are, for the message when some are missing
    LORA_TARGETS = ""       # regex of the module names that get a LoRA by default
    KOHYA_METADATA = {}     # ss_base_model_version and ss_network_module of a kohya-format file
    SIZE_MULTIPLE = 8       # image sides are multiples of this on the real model (the plan's)
    default_save_format = "diffusers"  # save.format when the config leaves it empty
    text_encoder_lora = False          # whether network.text_encoder is offered
    config_defaults = {}    # {"section.key": value} applied where a config leaves the key out
    memory = RuleOfThumb()  # its memory model (core/memory); a measured one subclasses MemoryModel
    tiny_presets = ("tiny",)  # `loralab make-tiny-model NAME --preset`

    def no_text_encoder_lora(self):
        """The message for network.text_encoder on a family without a text-encoder LoRA."""
        return (f"network.text_encoder = true: {self.title or self.name} does not offer a "
                "text-encoder LoRA; set it to false")

    def claims_files(self, model):
        """Whether the `model` section's single files are this family's, read from the files
        (model.family: auto). False when it gives none of them or they are another family's;
        ValueError when a file of its own keys cannot be what any family loads."""
        return False

    def describe_file(self, tensors):
        """Words for one of this family's files, from its header ({key: {"dtype", "shape"}}), as
        in "<path> looks like a FLUX.1 transformer (dev)"; None for a file that is not its own
        (core/families/__init__.py describe_file asks every family, then the shared parts)."""
        return None

    def advice(self, model):
        """The coach's warnings about the model a `model` section names: a known trap of this
        model (training a distilled one), for the plan and the run's start. None by default."""
        return []

    def make_tiny(self, folder, preset="tiny", single_file=None, comfyui=False):
        """Writes a tiny random model (a diffusers folder; also `single_file` and ComfyUI's files
        when asked) for tests and tries; returns the paths written, the folder last."""
        raise NotImplementedError(f"{self.name} has no tiny model")

    # -- loading and device moves ----------------------------------------------------------------
    def load(self, model, quantize="none", comfyui=None):
        """The pipeline from local files only, every part frozen. `model` is the resolved
        `model` config section (its `path` already a local folder or None, and the family's
        single files); `quantize` is already resolved from "auto"; `comfyui` is ComfyUI's
        folder, if known (core/ never imports ComfyUI: the node layer passes it)."""
        raise NotImplementedError

    def check_quantize(self, quantize):
        """ModelError unless `quantize` (model.quantize, resolved) is a mode this family offers."""
        modes = self.memory.quantize_modes
        if quantize not in (None, *modes):
            offered = " or ".join([", ".join(modes[:-1]), modes[-1]] if len(modes) > 1 else modes)
            raise ModelError(f"model.quantize = {quantize!r}: {self.title or self.name} offers {offered}; "
                             "set model.quantize to one of them or to \"auto\".")

    def size_multiple(self, pipeline) -> int:
        """Image sides must be a multiple of this (the VAE's downscale times any packing)."""
        return pipeline.vae_scale_factor

    def text_length(self, pipeline) -> int:
        """Text tokens the model reads per caption."""
        return pipeline.tokenizer.model_max_length

    # The defaults below are the transformer pipelines' (Z-Image, Qwen-Image, FLUX.2): one
    # `transformer`, one `vae` and a `text_encoder` that is dropped after caching.
    def trainable_model(self, pipeline):
        """The module the LoRA goes on (FLUX: the transformer)."""
        return pipeline.transformer

    def compute_dtype(self, pipeline):
        """The dtype batches are cast to for the trainable model."""
        return self.trainable_model(pipeline).dtype

    def uses_guidance(self, pipeline) -> bool:
        """Whether the model takes a guidance embedding while training (FLUX.1-dev)."""
        return False

    def encoders_to_device(self, pipeline, device):
        """The VAE and text encoders on `device` for caching; the trainable model stays put."""
        raise NotImplementedError

    def to_device(self, pipeline, device):
        """The VAE and the trainable model on `device`, for training and sampling."""
        pipeline.vae.to(device)
        self.trainable_model(pipeline).to(device)

    def offload_blocks(self, model):
        """The trainable model's blocks that train.offload_blocks may keep in host memory, in
        forward order (the last ones are offloaded first). Each must run whole in one call and be
        no larger than what the model's gradient checkpointing recomputes as one (the unit that
        is fetched again in backward). The transformers' block lists by default."""
        return [block for name in ("transformer_blocks", "single_transformer_blocks", "layers")
                for block in getattr(model, name, None) or ()]

    def free_text_encoders(self, pipeline):
        """Drops the text encoders after encoding (the large part of these pipelines);
        encode_prompts loads them again."""
        pipeline.register_modules(text_encoder=None)

    # -- the LoRA and its file -------------------------------------------------------------------
    def remove_lora(self, pipeline):
        """Takes every LoRA layer off the trainable model (and any text encoder)."""
        if getattr(pipeline.transformer, "peft_config", None):
            pipeline.transformer.unload_lora()

    def lora_targets(self, network) -> dict:
        """peft LoraConfig arguments (target_modules, and rank_pattern/alpha_pattern where some
        modules get their own rank) for the `network` config section."""
        return {"target_modules": self.LORA_TARGETS}

    def lora_to_diffusers(self, weights) -> dict:
        """The diffusers-format file's keys for peft LoRA weights (alpha baked in): names that
        diffusers' load_lora_weights and ComfyUI's LoRA loader both map in full."""
        raise NotImplementedError

    def lora_to_kohya(self, model):
        """A function mapping the LoRA's weights to kohya key names."""
        raise NotImplementedError

    # -- text ------------------------------------------------------------------------------------
    def encode_prompts(self, pipeline, prompts, device) -> dict:
        """{prompt: (embeddings, pooled)} on the CPU, for the cache."""
        raise NotImplementedError

    def text_encoders(self, pipeline) -> dict:
        """{name: module} of the text encoders a text-encoder LoRA goes on (network.text_encoder),
        loaded again if they were freed; `name` is the pipeline attribute, and its weights take
        the prefix `<name>.` in the LoRA file, as diffusers' save_lora_weights writes them. A
        family that does not offer a text-encoder LoRA raises ValueError."""
        raise ValueError(self.no_text_encoder_lora())

    def text_encoder_lora_targets(self, network) -> dict:
        """peft LoraConfig arguments of the text-encoder LoRA for the `network` section."""
        raise ValueError(self.no_text_encoder_lora())

    def encode_batch(self, pipeline, captions, device):
        """(text [B,seq,dim], pooled [B,dim]) of `captions` on `device`, with gradients through
        the text encoders (and their LoRA): for training them. With no LoRA (or one at zero) the
        values are encode_prompts'."""
        raise ValueError(self.no_text_encoder_lora())

    # -- images and training ---------------------------------------------------------------------
    def encode_image(self, pipeline, image, device):
        """The normalised latent of one PIL image at its bucket size, on the CPU."""
        raise NotImplementedError

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
        raise NotImplementedError

    def generate(self, pipeline, prompt_embeds, seed, steps, guidance_scale, width, height, device,
                 negative_embeds=None):
        """One PIL image per cached (text, pooled) pair, each from the same seed; a family with
        classifier-free guidance uses `negative_embeds` (the empty caption's pair)."""
        raise NotImplementedError
