"""Will a run fit the accelerator? The peak memory of one FLUX training step for each way of
storing the frozen transformer (model.quantize) with and without gradient checkpointing, the
choice of "auto" settings, and what to change when nothing fits, before any model loads.

The peak of a step is:
  frozen transformer (memory.base_bytes: quantized block linears, the rest in model.dtype)
  + LoRA weights, gradients and optimizer states (memory.estimate_memory)
  + activations kept for backward (below) + quantization transients (below)
  + VAE (resident: the trainer keeps it on the device for sample images)
  + CUDA context and framework overhead.
T5-XXL and CLIP-L are not counted: they encode the captions once before the transformer moves to
the device, then are freed (flux.free_text_encoders), so they are never resident during a step.

Activations. Each block keeps, per token (image + text) and per unit of hidden width, a fixed
number of bytes for backward. Counted on diffusers' FluxTransformerBlock and
FluxSingleTransformerBlock with the LoRA on LORA_TARGETS (autograd's saved tensors, float32,
hidden 384-1536): 17 hidden-widths per block in either kind:
  LoRA / linear inputs (q,k,v input, attention output, MLP input and GELU output 4d): 7 (6 single)
  GELU input (4d): 4;  scaled_dot_product_attention q, k, v, output: 3 (4 single)
  modulation and gate multiplications: 2;  LayerNorm input: 1
plus the block's own input where the previous block's output is not already kept.
Under bf16 autocast part of them is float32 (LayerNorm outputs and what multiplies them): 44.3
bytes per token and hidden unit instead of 17 x 2. With gradient checkpointing a block keeps only
its input (one hidden-width in model.dtype) and one block at a time is recomputed in backward.
Backward needs working memory on top (gradients of a block's activations, GELU's 4d gradient).

Calibration (CPU, peak RSS growth over one forward + backward, glibc with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS; heads 4-8 x 128, 2+4 and 4+8 blocks,
1024 image + 256 text tokens, batch 1 and 2): float32 17.4 widths per block, 40.8 bytes of
working memory per token-hidden without checkpointing, 45 with; bf16 autocast 316.6 bytes per
token-hidden for 6 blocks (45 per block + 47 working), checkpointed 105.4. The estimate below
matches those measurements within 3%; tests/test_fit.py checks it on fresh shapes. The GPU
(CUDA kernels, caching allocator) is checked by benchmarks/gpu_memory.py.
"""
from dataclasses import dataclass

from .. import UserError
from ..dtypes import bytes_per_value
from .memory import config_shape, estimate_memory, gigabytes

QUANTIZE_ORDER = ("none", "fp8", "int8", "nf4")   # least memory-saving first
CUDA_ONLY = ("int8", "nf4")                        # bitsandbytes
HEADROOM = 0.10                                    # of the device's memory, kept free

# Bytes per token per unit of hidden width (see the module's docstring for the calibration).
BLOCK_SAVED = {"fp32": 69.6, "mixed": 45.0}   # all of a block's saved activations
WORKING = {"fp32": 42.0, "mixed": 47.0}       # backward's working memory, and the head and tail
TEXT_TOKENS = {True: 512, False: 256}         # dev (guidance) / schnell T5 tokens

CUDA_CONTEXT = 0.5 * 2**30       # CUDA context, cuBLAS/cuDNN handles: outside torch's allocator
FRAMEWORK = 0.3 * 2**30          # caching-allocator fragmentation, workspaces, small buffers
VAE_PARAMETERS = 83_819_683      # FLUX.1 AutoencoderKL (ae.safetensors)
T5_XXL_PARAMETERS = 4_762_310_656  # T5-XXL encoder: encodes captions once, then on the CPU
# 1 byte (fp8) or less per weight is stored, computed in bf16: each block linear's weight is
# dequantized to a bf16 copy per call (forward, and again in backward), freed after the call.
COMPUTE_BYTES = 2


class DoesNotFit(UserError, ValueError):
    """No allowed setting fits the device; the message gives the estimate and what to change."""


def precision(config):
    return "fp32" if config["train"]["dtype"] == "fp32" else "mixed"


def image_tokens(resolution):
    """Packed latent tokens of a resolution x resolution image: VAE /8, then 2x2 patches."""
    return (resolution // 16) ** 2


def activation_bytes(shape, resolution, batch_size, checkpointing, train_dtype="bf16",
                     model_dtype="bf16"):
    """Peak activation memory of one training step (forward + backward) of the transformer."""
    mode = "fp32" if train_dtype == "fp32" else "mixed"
    tokens = batch_size * (image_tokens(resolution) + TEXT_TOKENS[shape.get("guidance", True)])
    blocks = shape["num_layers"] + shape["num_single_layers"]
    if checkpointing:
        per_token = blocks * bytes_per_value(model_dtype) + BLOCK_SAVED[mode] + WORKING[mode]
    else:
        per_token = blocks * BLOCK_SAVED[mode] + WORKING[mode]
    return tokens * shape["hidden"] * per_token


def quantize_transient_bytes(shape, quantize, checkpointing):
    """Dequantized copies alive during a step: one layer's at a time, with or without
    checkpointing. fp8 (Float8Linear) saves only the fp8 weight for backward and upcasts it again
    there; bitsandbytes dequantizes per call too. The widest layer is single blocks' proj_out."""
    d, m = shape["hidden"], shape["mlp"]
    if quantize == "fp8" or quantize in CUDA_ONLY:
        return (d + m) * d * COMPUTE_BYTES
    return 0


@dataclass
class PeakEstimate:
    quantize: str
    checkpointing: bool
    resolution: int
    base: float
    lora: float
    activations: float
    transient: float
    vae: float
    fixed: float        # CUDA context + framework overhead (0 on a CPU)

    @property
    def allocated(self):
        """What torch.cuda.max_memory_allocated would show (no context, no fragmentation)."""
        return self.base + self.lora + self.activations + self.transient + self.vae

    @property
    def total(self):
        return self.allocated + self.fixed


def peak_breakdown(config, quantize, gradient_checkpointing, resolution, shape=None,
                   device_type="cuda"):
    """PeakEstimate of one training step with these settings (config: defaults-filled)."""
    shape = shape or config_shape(config)
    memory = estimate_memory(config, quantize, shape)
    model, train = config["model"], config["train"]
    activations = activation_bytes(shape[0], resolution, train["batch_size"], gradient_checkpointing,
                                   train["dtype"], model["dtype"])
    vae = VAE_PARAMETERS * bytes_per_value(model["dtype"])
    fixed = CUDA_CONTEXT + FRAMEWORK if device_type == "cuda" else 0
    return PeakEstimate(quantize, bool(gradient_checkpointing), resolution, memory.base_bytes,
                        memory.lora_bytes, activations,
                        quantize_transient_bytes(shape[0], quantize, gradient_checkpointing), vae, fixed)


def estimate_peak(config, quantize, gradient_checkpointing, resolution):
    """Estimated peak bytes on a CUDA device of one training step."""
    return peak_breakdown(config, quantize, gradient_checkpointing, resolution).total


def fits(estimate_bytes, device_bytes):
    return estimate_bytes <= device_bytes * (1 - HEADROOM)


def fit_table(config, resolutions=None, modes=QUANTIZE_ORDER):
    """[PeakEstimate] for each quantize mode x resolution x checkpointing off/on."""
    shape = config_shape(config)
    resolutions = resolutions or sorted(config["dataset"]["resolution"])
    return [peak_breakdown(config, mode, checkpointing, resolution, shape)
            for mode in modes for resolution in resolutions for checkpointing in (False, True)]


def device_memory(device):
    """Total bytes of a CUDA device, None for anything else (CPU, MPS)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory


def _with(config, changes):
    """A copy of config with (section, key) -> value changes."""
    copy = {section: dict(values) if isinstance(values, dict) else values
            for section, values in config.items()}
    for (section, key), value in changes.items():
        copy[section][key] = value
    return copy


def _leaner_steps(config, device_type):
    """Changes that lower the peak, in the order that costs the LoRA least: (description,
    config changes, quantize, checkpointing), each on top of the ones before."""
    model, train = config["model"], config["train"]
    quantize = model["quantize"]
    checkpointing = train["gradient_checkpointing"]
    steps = []
    leanest = "nf4" if device_type == "cuda" else "fp8"
    for mode in QUANTIZE_ORDER:
        if mode in CUDA_ONLY and device_type != "cuda":
            continue
        if QUANTIZE_ORDER.index(mode) > QUANTIZE_ORDER.index(quantize if quantize in QUANTIZE_ORDER else "none"):
            steps.append((f"model.quantize {mode}", {}, mode, checkpointing))
            quantize = mode
        if mode == leanest:
            break
    if checkpointing is not True:
        steps.append(("train.gradient_checkpointing true", {}, quantize, True))
        checkpointing = True
    resolutions = sorted(config["dataset"]["resolution"])
    for low in (1024, 768, 512):
        if resolutions[-1] > low:
            kept = resolutions = [r for r in resolutions if r <= low] or [low]
            steps.append((f"dataset.resolution {kept}", {("dataset", "resolution"): kept},
                          quantize, checkpointing))
    for rank in (16, 8, 4):
        if config["network"]["linear"] > rank:
            steps.append((f"network.linear {rank}", {("network", "linear"): rank}, quantize,
                          checkpointing))
    if train["batch_size"] > 1:
        steps.append(("train.batch_size 1", {("train", "batch_size"): 1}, quantize, checkpointing))
    return steps


def suggestions(config, device_bytes, device_type="cuda"):
    """[(change, estimate after it)] applied one after another until the estimate fits (all of
    them when nothing does), and whether the last one fits."""
    shape = config_shape(config)
    current, applied = config, []
    for description, changes, quantize, checkpointing in _leaner_steps(config, device_type):
        current = _with(current, changes)
        checkpointing = checkpointing is True
        peak = peak_breakdown(current, quantize, checkpointing,
                              max(current["dataset"]["resolution"]), shape, device_type).total
        applied.append((description, peak))
        if fits(peak, device_bytes):
            return applied, True
    return applied, False


def _explicit(value, auto="auto"):
    return None if value == auto else value


def resolve_memory_settings(config, device_total_bytes, device_type):
    """(quantize, gradient_checkpointing, notes) for a run: "auto" values chosen from the
    estimate at the largest dataset.resolution, explicit ones kept. Raises DoesNotFit before
    anything loads when the settings cannot fit device_total_bytes with 10% headroom."""
    quantize = _explicit(config["model"]["quantize"])
    checkpointing = _explicit(config["train"]["gradient_checkpointing"])
    notes = []
    if not _memory_model(config).estimated:
        return unet_memory_settings(config, device_total_bytes, device_type, checkpointing)
    if device_type != "cuda":
        if quantize in CUDA_ONLY:
            notes.append(f"model.quantize {quantize} needs bitsandbytes on a CUDA GPU; this is a "
                         f"{device_type}.")
        chosen = (quantize or "none", False if checkpointing is None else checkpointing)
        if quantize is None or checkpointing is None:
            notes.append(f"on the {device_type}: model.quantize {chosen[0]}, gradient checkpointing "
                         f"{'on' if chosen[1] else 'off'} (auto).")
        return chosen[0], chosen[1], notes
    resolution = max(config["dataset"]["resolution"])
    if device_total_bytes is None:
        chosen = (quantize or "none", True if checkpointing is None else checkpointing)
        notes.append("the device's memory is unknown: auto keeps the base unquantized and "
                     "turns gradient checkpointing on.")
        return chosen[0], chosen[1], notes
    shape = config_shape(config)
    modes = [quantize] if quantize else list(QUANTIZE_ORDER)
    switches = [checkpointing] if checkpointing is not None else [False, True]
    for mode in modes:
        for switch in switches:
            peak = peak_breakdown(config, mode, switch, resolution, shape).total
            if fits(peak, device_total_bytes):
                if quantize is None or checkpointing is None:
                    notes.append(f"auto: model.quantize {mode}, gradient checkpointing "
                                 f"{'on' if switch else 'off'}: about {gigabytes(peak)} at "
                                 f"{resolution} px of {gigabytes(device_total_bytes)}.")
                return mode, switch, notes
    raise DoesNotFit(does_not_fit_message(config, device_total_bytes, modes[0] if quantize else
                                          modes[-1], switches[-1], shape))


def _memory_model(config):
    from ..families import family_or_default

    return family_or_default(config["model"]["family"]).memory


def unet_memory_settings(config, device_total_bytes, device_type, checkpointing):
    """(quantize, gradient_checkpointing, notes) for SDXL / SD1.5: never quantized; "auto"
    checkpointing is on for a CUDA GPU under the family's size (or of unknown size)."""
    family = config["model"]["family"]
    if config["model"]["quantize"] not in ("auto", "none"):
        raise DoesNotFit(f"model.quantize {config['model']['quantize']} is FLUX.1-only; {family} "
                         "trains unquantized: set model.quantize to auto or none.")
    if checkpointing is not None:
        return "none", checkpointing, []
    limit = _memory_model(config).checkpointing_below_gb
    switch = device_type == "cuda" and (device_total_bytes is None or device_total_bytes < limit * 2**30)
    return "none", switch, [f"auto: {family} unquantized, gradient checkpointing "
                            f"{'on' if switch else 'off'} (on for GPUs under {limit} GB)."]


def does_not_fit_message(config, device_bytes, quantize, checkpointing, shape=None):
    resolution = max(config["dataset"]["resolution"])
    peak = peak_breakdown(config, quantize, checkpointing, resolution, shape).total
    lean = _with(config, {("model", "quantize"): quantize,
                          ("train", "gradient_checkpointing"): checkpointing})
    applied, fit = suggestions(lean, device_bytes)
    text = (f"estimated peak {gigabytes(peak)} (model.quantize {quantize}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}, {resolution} px, rank {config['network']['linear']}, "
            f"batch {config['train']['batch_size']}) does not fit this GPU's "
            f"{gigabytes(device_bytes)} with 10% headroom.")
    steps = "; then ".join(f"{change} (about {gigabytes(after)})" for change, after in applied)
    if fit:
        return f"{text} To fit, change in this order: {steps}."
    return (f"{text} Even {steps or 'these settings'} do not fit: a GPU with more memory is needed.")


def fit_report(config, vram_bytes, resolutions=None):
    """Text: the estimated peak per quantize mode at each training resolution, with and without
    gradient checkpointing, which fit vram_bytes, and what auto would choose."""
    family = config["model"]["family"]
    if not _memory_model(config).estimated:  # no estimate model for the UNet families yet
        checkpointing = _explicit(config["train"]["gradient_checkpointing"])
        _, _, notes = unet_memory_settings(config, vram_bytes, "cuda", checkpointing)
        return (f"memory fit for {gigabytes(vram_bytes)}: {family} trains unquantized; "
                + (" ".join(notes) or f"gradient checkpointing {'on' if checkpointing else 'off'} (given)."))
    rows = fit_table(config, resolutions)
    resolutions = sorted({row.resolution for row in rows})
    lines = [f"memory fit for {gigabytes(vram_bytes)} (estimate; fits = within 90%; "
             f"rank {config['network']['linear']}, batch {config['train']['batch_size']}, "
             f"{config['train']['optimizer']}):",
             "  quantize " + "".join(f"{f'{r} px: ckpt off / on':>24}" for r in resolutions)]
    for mode in QUANTIZE_ORDER:
        cells = []
        for resolution in resolutions:
            pair = [row for row in rows if row.quantize == mode and row.resolution == resolution]
            cells.append(" / ".join(f"{row.total / 2**30:5.1f}{'*' if fits(row.total, vram_bytes) else ' '}"
                                    for row in pair))
        note = " (CUDA only)" if mode in CUDA_ONLY else ""
        lines.append(f"  {mode:<8} " + "".join(f"{cell:>24}" for cell in cells) + note)
    lines.append("  (GiB; * fits)")
    try:
        quantize, checkpointing, _ = resolve_memory_settings(config, vram_bytes, "cuda")
        lines.append(f"  auto picks: model.quantize {quantize}, gradient checkpointing "
                     f"{'on' if checkpointing else 'off'}"
                     + _explicit_note(config))
    except DoesNotFit as error:
        lines.append(f"  does not fit: {error}")
    return "\n".join(lines)


def _explicit_note(config):
    given = [f"{name} {value}" for name, value in (
        ("model.quantize", config["model"]["quantize"]),
        ("train.gradient_checkpointing", config["train"]["gradient_checkpointing"])) if value != "auto"]
    return f" (given: {', '.join(given)})" if given else ""


def vram_gigabytes(text):
    """--vram 24 (GiB, as GPUs are sold) -> bytes."""
    return int(float(text) * 2**30)


def text_encoder_note(config):
    """T5-XXL's size while it encodes the captions (before training, then off the device)."""
    return (f"text encoders: T5-XXL ({gigabytes(T5_XXL_PARAMETERS * bytes_per_value(config['model']['dtype']))}) "
            "and CLIP-L are on the device only while the captions are encoded, not during training.")


__all__ = ["DoesNotFit", "PeakEstimate", "activation_bytes", "device_memory", "estimate_peak",
           "fit_report", "fit_table", "peak_breakdown", "resolve_memory_settings", "suggestions"]
