"""The one schema of every setting. Defaults come from the training guide (docs/training-guide.md); the
nodes' widgets, the CLI and the config file all read them from here. A family's own defaults
(resolution, sampling) are its `config_defaults` (core/families/<name>/), applied by load.py."""
from ..families import NAMES as FAMILY_NAMES
from .guide import LR, LR_RANGE, RANK, RANK_RECOMMENDED, RANK_SHORT_MEMORY, RESOLUTION_BAND, band, exponent

DTYPES = ["bf16", "fp16", "fp32"]
SAVE_DTYPES = ["float16", "bfloat16", "float32"]
OPTIMIZERS = ["adamw8bit", "adamw", "prodigy", "adafactor", "lion"]
NETWORK_TYPES = ["lora", "lokr", "loha"]  # peft LoraConfig, LoKrConfig, LoHaConfig (core/lora/inject.py)
SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
TIMESTEP_TYPES = ["sigmoid", "shift", "flux_shift"]
FAMILIES = ["auto", *FAMILY_NAMES]
PREDICTION_TYPES = ["auto", "epsilon", "v_prediction"]
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


def _guide(spec, note=""):
    """The setting's default is the guide's: the description says so, from the one number."""
    return {**spec, "description": f"{spec['description']} Guide: {spec['default']}{note}."}


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
        # \Z, not $: jsonschema matches with Python's re.search, where $ also matches before a
        # final newline ("name\n" would pass). 200 leaves a file name's 255 bytes room for
        # "-12" and "_000001200.state.safetensors".
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z", "maxLength": 200,
                 "default": "my_lora",
                 "description": "Run name: the run folder and the LoRA file are named after it."},
        "model": _section({
            "family": _choice(FAMILIES, "auto", "Model family: FLUX.1, SDXL, SD1.5, Z-Image, Qwen-Image or "
                              "FLUX.2 klein; auto reads it from the model's files."),
            "path": {"type": ["string", "null"], "minLength": 1, "default": None, "description":
                     "Local diffusers folder of the base model. Not needed when the single files "
                     "below are given (FLUX.1: the four files; SDXL/SD1.5: a checkpoint)."},
            "checkpoint_path": {"type": ["string", "null"], "default": None, "description":
                                "SDXL/SD1.5 single-file checkpoint (.safetensors: UNet, VAE and text "
                                "encoders), as ComfyUI keeps it in models/checkpoints."},
            "transformer_path": {"type": ["string", "null"], "default": None, "description":
                                 "Single-file transformer (.safetensors, BFL or diffusers keys; bf16, "
                                 "fp8 or scaled fp8), as ComfyUI keeps it in models/diffusion_models."},
            "clip_l_path": {"type": ["string", "null"], "default": None, "description":
                            "CLIP-L text encoder file (ComfyUI's models/text_encoders/clip_l.safetensors)."},
            "t5_path": {"type": ["string", "null"], "default": None, "description":
                        "T5-XXL text encoder file (t5xxl_fp16 or t5xxl_fp8_e4m3fn .safetensors)."},
            "text_encoder_path": {"type": ["string", "null"], "default": None, "description":
                                  "The text encoder file, as ComfyUI keeps it in models/text_encoders: "
                                  "Z-Image's Qwen3-4B (qwen_3_4b.safetensors), Qwen-Image's Qwen2.5-VL 7B "
                                  "(qwen_2.5_vl_7b.safetensors or _fp8_scaled)."},
            "vae_path": {"type": ["string", "null"], "default": None, "description":
                         "VAE file from ComfyUI's models/vae (FLUX.1: ae.safetensors; SDXL/SD1.5: "
                         "replaces the checkpoint's VAE)."},
            "dtype": _choice(DTYPES, "bf16", "Precision the frozen base model is loaded in."),
            "quantize": _choice(QUANTIZE, "auto",
                                "How the frozen transformer is stored: auto picks the least saving mode "
                                "whose estimate fits the device (none on a CPU); fp8 stores float8 "
                                "weights computed in bf16; nf4/int8 use bitsandbytes (CUDA). FLUX.1, "
                                "FLUX.2, Z-Image and Qwen-Image; SDXL/SD1.5 are not quantized."),
            "encode_on": _choice(["auto", "device", "cpu"], "auto", "Where captions are encoded "
                                 "before training: device (the GPU, then the text encoders are freed "
                                 "before the trained model comes on); cpu (never on the GPU: slower "
                                 "caching, for cards too small for the text encoder); auto is device "
                                 "when the text encoder fits beside nothing else, cpu otherwise."),
            "prediction_type": _choice(PREDICTION_TYPES, "auto", "SDXL/SD1.5: what the UNet predicts; "
                                       "auto reads it from the model (v_prediction for v-pred "
                                       "checkpoints such as NoobAI-XL V-Pred)."),
            "clip_skip": _int(1, 1, 12, "SD1.5/SDXL: 1 uses the text encoder's last layer; 2 the "
                              "one before it (common for anime models)."),
        }),
        "dataset": _section({
            "folder": {"type": "string", "minLength": 1,
                       "description": "Folder of images with same-name caption files."},
            "caption_ext": {"type": "string", "pattern": r"^\.?[A-Za-z0-9]+\Z", "default": "txt",
                            "description": "Extension of the caption files."},
            "trigger_word": {"type": "string", "default": "", "description":
                             "Replaces [trigger] in captions; prepended where a caption lacks it."},
            "repeats": _guide(_int(1, 1, 1000, "Times each image repeats per epoch."), " in most cases"),
            "resolution": {"type": "array", "minItems": 1, "default": [512, 768, 1024],
                           "items": {"type": "integer", "minimum": 32, "maximum": 4096},
                           "description": f"Training resolutions (bucket areas). Guide: {band(RESOLUTION_BAND)}."},
            "caption_dropout_rate": _guide(_number(0.05, 0.0, 1.0,
                                                   "Share of steps trained with an empty caption.")),
            "cache": _choice(["memory", "disk"], "memory",
                             "Where VAE latents and text embeddings are cached."),
            "validation_images": _int(0, 0, 100000, "Images held out of training to measure a "
                                      "validation loss every performance_log_every steps (spread "
                                      "evenly over the sorted file names); 0 turns it off."),
            "regularization_folder": {"type": "string", "default": "", "description":
                                      "Regularization images (kohya's reg_data_dir): pictures of what "
                                      "the model must keep drawing as it did, captioned as written (no "
                                      "trigger word), trained beside the dataset "
                                      "(dataset.regularization_ratio of them per training image in each "
                                      "epoch); builtin:demo-shapes goes with the demo. Empty is off."},
            "regularization_ratio": _number(1.0, 0.05, 10.0, "Regularization entries per training "
                                            "entry in each epoch: 1 (kohya's balance) needs twice the "
                                            "steps for the same training on the dataset's images."),
            "regularization_weight": _number(1.0, 0.0, 100.0, "Loss weight of the regularization "
                                             "images beside the training images (kohya's "
                                             "prior_loss_weight)."),
            "mask_folder": {"type": "string", "default": "", "description":
                            "Masked loss: a folder of grey masks, one per image with the image's "
                            "name and size; white trains fully, black at dataset.mask_min. Empty is off."},
            "alpha_mask": {"type": "boolean", "default": False, "description":
                           "Masked loss from each image's own alpha channel (opaque trains fully)."},
            "mask_min": _number(0.1, 0.0, 1.0, "Loss weight where the mask is black (OneTrainer's "
                                "unmasked weight): 0 ignores those pixels, 1 turns masking off."),
        }, required=["folder"]),
        "network": _section({
            "type": _choice(NETWORK_TYPES, "lora", "Adapter type, built with peft: lora; lokr (LyCORIS "
                            "LoKr, a Kronecker product: small files, common for styles); loha (LyCORIS "
                            "LoHa, a Hadamard product of two low-rank pairs)."),
            "dora": {"type": "boolean", "default": False, "description":
                     "type lora only: DoRA (weight-decomposed LoRA): a trained magnitude per output "
                     "row beside the LoRA; about 10-20% slower per step."},
            "lokr_factor": _int(-1, -1, 1024, "type lokr: the Kronecker factor (LyCORIS's factor); "
                                "-1 (LyCORIS's default) splits each dimension as evenly as possible."),
            "lokr_full_rank": {"type": "boolean", "default": False, "description":
                               "type lokr: both Kronecker factors full matrices (LyCORIS's 'full "
                               "matrix' mode, there a dim of 10000+); network.linear is then unused "
                               "and the scale is 1. Use with a larger lokr_factor (e.g. 8-16)."},
            "linear": _int(RANK, 1, 1024, f"LoRA rank. Guide: {band(RANK_RECOMMENDED)} for most cases, "
                           f"{band(RANK_SHORT_MEMORY)} when memory is short."),
            "linear_alpha": {"type": ["number", "null"], "default": None, "exclusiveMinimum": 0,
                             "description": "LoRA alpha; empty means equal to linear (scale 1)."},
            "feed_forward": {"type": "boolean", "default": False, "description":
                             "SDXL/SD1.5: also train the UNet's feed-forward layers (attention "
                             "only by default). FLUX.1 always trains its MLPs."},
            "conv": _int(0, 0, 1024, "SDXL/SD1.5: rank of a LoRA on the UNet's conv layers "
                         "(LoCon); 0 leaves them frozen. Common: 4-16."),
            "conv_alpha": {"type": ["number", "null"], "default": None, "exclusiveMinimum": 0,
                           "description": "Alpha of the conv LoRA; empty means equal to conv."},
            "text_encoder": {"type": "boolean", "default": False, "description":
                             "SDXL/SD1.5: also train a LoRA on the text encoders (CLIP's attention "
                             "and MLP linears); caption embeddings are then encoded every step, not "
                             "cached. FLUX.1 does not offer it."},
        }),
        "train": _section({
            "steps": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000, "default": None,
                      "description": "Total steps; empty picks them from the dataset size (guide's table)."},
            "batch_size": _guide(_int(1, 1, 64, "Images per step."), ", unequivocally"),
            "gradient_accumulation_steps": _int(1, 1, 1024, "Steps whose gradients add up before an update."),
            "lr": _number(LR, 0.0, 1.0, f"Learning rate. Guide: {exponent(LR)}; optimal range {LR_RANGE}."),
            "text_encoder_lr": {"type": ["number", "null"], "default": None, "minimum": 0.0,
                                "maximum": 1.0, "description":
                                "Learning rate of the text-encoder LoRA (network.text_encoder); empty "
                                "means train.lr. Commonly lower than the UNet's, e.g. 5e-5 (kohya)."},
            "optimizer": _guide(_choice(OPTIMIZERS, "adamw8bit", "Optimizer."), " (memory saving)"),
            "lr_scheduler": _choice(SCHEDULERS, "constant", "Learning-rate schedule, as diffusers' "
                                    "get_scheduler means it: constant (no warm-up), constant_with_warmup, "
                                    "or linear / cosine (warm-up, then down to 0 at the last step)."),
            "lr_warmup_steps": _int(0, 0, 1000000, "Steps over which the rate rises from 0 to train.lr "
                                    "(constant_with_warmup, linear, cosine; constant ignores it)."),
            "max_grad_norm": _number(1.0, 0.0, 1000.0, "Gradient clipping; 0 turns it off."),
            "max_nonfinite_steps": _int(10, 1, 1000000, "A step whose loss or gradients are NaN/inf "
                                        "is skipped; this many in a row stop the run."),
            "dtype": _choice(DTYPES, "bf16", "Mixed precision of the training step."),
            "gradient_checkpointing": {"type": ["string", "boolean"], "enum": ["auto", True, False],
                                       "default": "auto", "description":
                                       "Trade compute for memory; auto turns it on only when the "
                                       "memory estimate needs it."},
            "offload_blocks": {"type": ["string", "integer"], "pattern": r"^auto\Z", "minimum": 0,
                               "maximum": 1000, "default": "auto", "description":
                               "Blocks of the trained model kept in CPU memory and copied to the GPU "
                               "just before their forward and backward (block swapping, as musubi-"
                               "tuner's blocks_to_swap): less VRAM, slower steps, the same LoRA. 0 "
                               "is off; auto offloads only as many as the memory estimate needs "
                               "(none on a CPU)."},
            "seed": _int(42, 0, 2**32 - 1, "Seed of noise, timesteps, caption dropout and order."),
            "timestep_type": _choice(TIMESTEP_TYPES, "sigmoid", "How noise levels are drawn."),
            "guidance": _number(1.0, 0.0, 100.0, "Guidance embedding value while training FLUX.1-dev."),
            "noise_offset": _number(0.0, 0.0, 1.0, "SDXL/SD1.5: per-channel offset added to the noise, "
                                    "for darker darks and brighter brights. Common: 0.0357."),
            "min_snr_gamma": {"type": ["number", "null"], "default": None, "exclusiveMinimum": 0,
                              "description": "SDXL/SD1.5: min-SNR-gamma loss weighting; empty is "
                                             "off. Common: 5."},
            "timestep_min": _int(0, 0, 999, "SDXL/SD1.5: lowest training timestep drawn (of 1000)."),
            "timestep_max": _int(1000, 1, 1000, "SDXL/SD1.5: timesteps are drawn below this."),
            "zero_terminal_snr": {"type": "boolean", "default": False, "description":
                                  "SDXL/SD1.5: rescale the noise schedule to zero terminal SNR "
                                  "(for v-prediction models trained that way)."},
            "preservation_class": {"type": "string", "default": "", "description":
                                   "Preservation against bleed: the class word that the trigger "
                                   "stands for (e.g. star). On steps with the trigger, the LoRA's "
                                   "prediction for the caption with the class word instead is "
                                   "pulled toward the base model's. Needs dataset.trigger_word; "
                                   "empty is off."},
            "preservation_weight": _number(1.0, 0.0, 100.0, "Weight of the preservation loss "
                                           "(train.preservation_class) beside the training loss."),
            "ema": {"type": "boolean", "default": False, "description":
                    "Keep an exponential moving average (EMA) of the LoRA weights; samples, "
                    "checkpoints and the final LoRA use it. Smoother, less overfit results on long "
                    "runs; on short runs it lags the training."},
            "ema_decay": _number(0.999, 0.0, 0.99999, "How slowly the EMA (train.ema) follows the "
                                 "training: each update keeps this share of it (after a warm-up). "
                                 "0.999 averages about the last 1000 steps."),
            "resume": {"type": "boolean", "default": True,
                       "description": "Continue from the newest kept checkpoint of the run."},
        }),
        "save": _section({
            "dtype": _guide(_choice(SAVE_DTYPES, "float16", "Precision of saved LoRA files.")),
            "format": {"type": ["string", "null"], "enum": ["diffusers", "kohya", None],
                       "default": None, "description":
                       "Key names of the LoRA file; empty: diffusers for FLUX, kohya for SDXL/SD1.5."},
            "save_every": _guide(_int(250, 1, 1000000, "Steps between checkpoints.")),
            "max_step_saves_to_keep": _guide(_int(4, 1, 1000, "Newest step checkpoints kept.")),
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
            "performance_log_every": _guide(_int(10, 1, 1000000,
                                                 "Steps between metrics lines (loss, time, memory).")),
        }),
    },
}


def field(path):
    """The schema of one setting by its dotted path, e.g. field("train.lr")."""
    node = SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node
