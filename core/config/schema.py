"""The one schema of every setting. Defaults come from the training guide (docs/training-guide.md); the
nodes' widgets, the CLI and the config file all read them from here."""

DTYPES = ["bf16", "fp16", "fp32"]
SAVE_DTYPES = ["float16", "bfloat16", "float32"]
OPTIMIZERS = ["adamw8bit", "adamw", "prodigy", "adafactor", "lion"]
SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
TIMESTEP_TYPES = ["sigmoid", "shift", "flux_shift"]
FAMILIES = ["flux"]  # sdxl and sd15 join when their families land
QUANTIZE = ["auto", "none", "fp8", "nf4", "int8"]


def _int(default, minimum, maximum=None, help=""):
    spec = {"type": "integer", "default": default, "minimum": minimum, "description": help}
    if maximum is not None:
        spec["maximum"] = maximum
    return spec


def _number(default, minimum, maximum, help=""):
    return {"type": "number", "default": default, "minimum": minimum, "maximum": maximum,
            "description": help}


def _choice(options, default, help=""):
    return {"type": "string", "enum": options, "default": default, "description": help}


def _section(properties, required=()):
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required), "default": {}}


SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "LoRA Lab training config",
    "type": "object",
    "additionalProperties": False,
    "required": ["model", "dataset"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", "default": "my_lora",
                 "description": "Run name: the run folder and the LoRA file are named after it."},
        "model": _section({
            "family": _choice(FAMILIES, "flux", "Model family. FLUX.1 is supported today."),
            "path": {"type": ["string", "null"], "minLength": 1, "default": None, "description":
                     "Local diffusers folder of the base model (transformer, vae, text encoders). "
                     "Not needed when the four single files below are given."},
            "transformer_path": {"type": ["string", "null"], "default": None, "description":
                                 "Single-file transformer (.safetensors, BFL or diffusers keys; bf16, "
                                 "fp8 or scaled fp8), as ComfyUI keeps it in models/diffusion_models."},
            "clip_l_path": {"type": ["string", "null"], "default": None, "description":
                            "CLIP-L text encoder file (ComfyUI's models/text_encoders/clip_l.safetensors)."},
            "t5_path": {"type": ["string", "null"], "default": None, "description":
                        "T5-XXL text encoder file (t5xxl_fp16 or t5xxl_fp8_e4m3fn .safetensors)."},
            "vae_path": {"type": ["string", "null"], "default": None, "description":
                         "VAE file (ComfyUI's models/vae/ae.safetensors)."},
            "dtype": _choice(DTYPES, "bf16", "Precision the frozen base model is loaded in."),
            "quantize": _choice(QUANTIZE, "auto",
                                "How the frozen transformer is stored: auto picks the least saving mode "
                                "whose estimate fits the device (none on a CPU); fp8 stores float8 "
                                "weights computed in bf16; nf4/int8 use bitsandbytes (CUDA)."),
        }),
        "dataset": _section({
            "folder": {"type": "string", "minLength": 1,
                       "description": "Folder of images with same-name caption files."},
            "caption_ext": {"type": "string", "pattern": r"^\.?[A-Za-z0-9]+$", "default": "txt",
                            "description": "Extension of the caption files."},
            "trigger_word": {"type": "string", "default": "", "description":
                             "Replaces [trigger] in captions; prepended where a caption lacks it."},
            "repeats": _int(1, 1, 1000, "Times each image repeats per epoch. Guide: 1 in most cases."),
            "resolution": {"type": "array", "minItems": 1, "default": [512, 768, 1024],
                           "items": {"type": "integer", "minimum": 32, "maximum": 4096},
                           "description": "Training resolutions (bucket areas). Guide: 512-1024."},
            "caption_dropout_rate": _number(0.05, 0.0, 1.0,
                                            "Share of steps trained with an empty caption. Guide: 0.05."),
            "cache": _choice(["memory", "disk"], "memory",
                             "Where VAE latents and text embeddings are cached."),
        }, required=["folder"]),
        "network": _section({
            "linear": _int(16, 1, 1024, "LoRA rank. Guide: 16-32 for most cases, 4-8 when memory is short."),
            "linear_alpha": {"type": ["number", "null"], "default": None, "exclusiveMinimum": 0,
                             "description": "LoRA alpha; empty means equal to linear (scale 1)."},
        }),
        "train": _section({
            "steps": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000, "default": None,
                      "description": "Total steps; empty picks them from the dataset size (guide's table)."},
            "batch_size": _int(1, 1, 64, "Images per step. Guide: 1, unequivocally."),
            "gradient_accumulation_steps": _int(1, 1, 1024, "Steps whose gradients add up before an update."),
            "lr": _number(1e-4, 0.0, 1.0, "Learning rate. Guide: 1e-4; optimal range 1e-4 to 8e-4."),
            "optimizer": _choice(OPTIMIZERS, "adamw8bit", "Guide: adamw8bit (memory saving)."),
            "lr_scheduler": _choice(SCHEDULERS, "constant", "Learning-rate schedule."),
            "lr_warmup_steps": _int(0, 0, 1000000, "Warm-up steps for the schedule."),
            "max_grad_norm": _number(1.0, 0.0, 1000.0, "Gradient clipping; 0 turns it off."),
            "max_nonfinite_steps": _int(10, 1, 1000000, "A step whose loss or gradients are NaN/inf "
                                        "is skipped; this many in a row stop the run."),
            "dtype": _choice(DTYPES, "bf16", "Mixed precision of the training step."),
            "gradient_checkpointing": {"type": ["string", "boolean"], "enum": ["auto", True, False],
                                       "default": "auto", "description":
                                       "Trade compute for memory; auto turns it on only when the "
                                       "memory estimate needs it."},
            "seed": _int(42, 0, 2**32 - 1, "Seed of noise, timesteps, caption dropout and order."),
            "timestep_type": _choice(TIMESTEP_TYPES, "sigmoid", "How noise levels are drawn."),
            "guidance": _number(1.0, 0.0, 100.0, "Guidance embedding value while training FLUX.1-dev."),
            "resume": {"type": "boolean", "default": True,
                       "description": "Continue from the newest kept checkpoint of the run."},
        }),
        "save": _section({
            "dtype": _choice(SAVE_DTYPES, "float16", "Precision of saved LoRA files. Guide: float16."),
            "format": {"type": ["string", "null"], "enum": ["diffusers", "kohya", None],
                       "default": None, "description":
                       "Key names of the LoRA file; empty: diffusers for FLUX, kohya for SDXL/SD1.5."},
            "save_every": _int(250, 1, 1000000, "Steps between checkpoints. Guide: 250."),
            "max_step_saves_to_keep": _int(4, 1, 1000, "Newest step checkpoints kept. Guide: 4."),
            "output_dir": {"type": "string", "minLength": 1, "default": "output",
                           "description": "Folder that holds the run folders."},
        }),
        "sample": _section({
            "sample_every": _int(250, 0, 1000000, "Steps between sample images; 0 turns sampling off."),
            "prompts": {"type": "array", "items": {"type": "string"},
                        "default": ["a photo of [trigger]"], "description":
                        "Sample prompts; [trigger] is replaced by the trigger word."},
            "seed": _int(42, 0, 2**32 - 1, "Seed of the sample images (the same at every sampling)."),
            "sample_steps": _int(20, 1, 200, "Denoising steps per sample image."),
            "guidance_scale": _number(4.0, 0.0, 30.0, "Guidance of the sample images."),
            "width": _int(1024, 16, 4096, "Sample width in pixels."),
            "height": _int(1024, 16, 4096, "Sample height in pixels."),
        }),
        "logging": _section({
            "performance_log_every": _int(10, 1, 1000000,
                                          "Steps between metrics lines (loss, time, memory). Guide: 10."),
        }),
    },
}


def field(path):
    """The schema of one setting by its dotted path, e.g. field("train.lr")."""
    node = SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node
