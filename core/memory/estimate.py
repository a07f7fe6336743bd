"""How much accelerator memory a training step takes, estimated from shapes before any model
loads (docs/training-guide.md, section 1: "show the memory the chosen rank costs"). What is generic
is here: the LoRA's weights, gradients and optimizer states, the frozen model quantized or not,
the fixed costs of a CUDA device. What is the family's (its shapes, its LoRA, its activations) is
its memory model (core/families/<name>/, MemoryModel in core/families/base.py).

The peak of a step is:
  frozen trainable model (base_bytes: quantized linears, the rest in model.dtype), less the
    blocks train.offload_blocks keeps in CPU memory but the IN_FLIGHT ones on their way through
  + LoRA weights, gradients and optimizer states (estimate_memory)
  + activations kept for backward + quantization transients (the family's memory model)
  + what else stays on the device (the VAE, for sample images)
  + CUDA context and framework overhead."""
from dataclasses import dataclass

from ..dtypes import bytes_per_value
from ..families import family_or_default

# Bytes per trainable parameter beyond its float32 weight and gradient (4 + 4 bytes).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,        # two float32 moments
    "adamw8bit": 2,    # two 8-bit moments
    "prodigy": 16,     # two moments, the initial weights and its step-size state, float32
    "adafactor": None,  # factored second moment: see state_bytes
    "lion": 1,         # one 8-bit moment (bitsandbytes Lion8bit)
}

# Bytes per quantized weight: fp8 and int8 one byte (one float32 scale per tensor / per output
# row, negligible); nf4 half a byte plus a float32 absmax per 64-value block (bitsandbytes'
# default blocksize, no double quantization).
QUANTIZED_BYTES = {"fp8": 1, "int8": 1, "nf4": 0.5 + 4 / 64}
CUDA_ONLY = ("int8", "nf4")      # bitsandbytes
HEADROOM = 0.10                  # of the device's memory, kept free
CUDA_CONTEXT = 0.5 * 2**30       # CUDA context, cuBLAS/cuDNN handles: outside torch's allocator
FRAMEWORK = 0.3 * 2**30          # caching-allocator fragmentation, workspaces, small buffers
# Offloaded blocks on the device at once: the one computing and the next, prefetched (the
# mechanism's bound, core/trainer's block swapper). The LoRA's own parameters stay resident.
IN_FLIGHT = 2


def state_bytes(optimizer, rank):
    """Optimizer-state bytes per LoRA parameter. Adafactor keeps one float per row and one per
    column of each matrix: for a rank x n LoRA matrix about 4 / rank bytes per parameter."""
    if optimizer == "adafactor":
        return 4 / rank
    return OPTIMIZER_STATE_BYTES.get(optimizer, 8)


def base_bytes(shape, quantize, dtype):
    """Resident bytes of the frozen model: its quantizable weights stored quantized, the rest in
    dtype."""
    full = bytes_per_value(dtype or "bf16")
    if quantize not in QUANTIZED_BYTES:
        return shape["parameters"] * full
    quantized = min(shape["quantizable"], shape["parameters"])
    return quantized * QUANTIZED_BYTES[quantize] + (shape["parameters"] - quantized) * full


def block_bytes(memory, shape, quantize, dtype):
    """Bytes of each block's weights, in forward order, as stored (quantized or in dtype)."""
    per_weight = QUANTIZED_BYTES.get(quantize, bytes_per_value(dtype or "bf16"))
    return [count * per_weight for count in memory.block_parameters(shape)]


def offloaded_bytes(blocks, offload_blocks):
    """Bytes off the device with the last `offload_blocks` of `blocks` (bytes each) in CPU memory
    (the last, as musubi-tuner's blocks_to_swap; for FLUX.1 the smaller single blocks, so the
    estimate errs high), less the IN_FLIGHT largest of them that visit the device at once."""
    moved = blocks[len(blocks) - offload_blocks:] if offload_blocks else []
    return sum(moved) - sum(sorted(moved)[-IN_FLIGHT:])


def parameters(count):
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


def gigabytes(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.0f} MiB"


@dataclass
class MemoryEstimate:
    rank: int
    optimizer: str
    lora_parameters: int
    lora_bytes: float          # weights + gradients + optimizer states
    base_parameters: int
    base_bytes: float          # the frozen model in its dtype or quantization
    model_source: str          # where the shapes came from

    @property
    def total_bytes(self):
        return self.lora_bytes + self.base_bytes

    def describe(self):
        per_parameter = 8 + state_bytes(self.optimizer, self.rank)
        return (f"LoRA rank {self.rank}: {parameters(self.lora_parameters)} parameters x "
                f"{per_parameter:.3g} bytes (weights, gradients, {self.optimizer} states) = "
                f"{gigabytes(self.lora_bytes)}; frozen transformer {parameters(self.base_parameters)} "
                f"parameters = {gigabytes(self.base_bytes)}; about {gigabytes(self.total_bytes)} "
                f"in all, plus activations (they grow with resolution and batch size; gradient "
                f"checkpointing keeps them small). Shapes: {self.model_source}.")


def memory_model(config):
    """The memory model of the config's family (the default family's while it is auto)."""
    return family_or_default(config["model"]["family"]).memory


def config_shape(config):
    """(shape, description) of the config's trainable model, from its family's memory model."""
    return memory_model(config).shape(config["model"])


def estimate_memory(config, quantize=None, shape=None):
    """MemoryEstimate for a resolved (or defaults-filled) config; quantize overrides
    model.quantize ("auto" counts as "none": the unquantized base)."""
    if not memory_model(config).estimated:
        raise ValueError(f"model.family {config['model']['family']}: no memory estimate yet")
    shape, source = shape or config_shape(config)
    rank, optimizer = config["network"]["linear"], config["train"]["optimizer"]
    lora = memory_model(config).lora_parameters(shape, config["network"])
    per_parameter = 8 + state_bytes(optimizer, rank)
    base = base_bytes(shape, quantize or config["model"].get("quantize"), config["model"].get("dtype"))
    return MemoryEstimate(rank, optimizer, lora, lora * per_parameter, shape["parameters"],
                          base, source)


@dataclass
class PeakEstimate:
    quantize: str
    checkpointing: bool
    resolution: int
    base: float         # the frozen model's bytes on the device (offloaded blocks excluded)
    lora: float
    activations: float
    transient: float
    vae: float
    fixed: float        # CUDA context + framework overhead (0 on a CPU)
    offload_blocks: int = 0
    offloaded: float = 0.0   # the frozen model's bytes kept in CPU memory

    @property
    def allocated(self):
        """What torch.cuda.max_memory_allocated would show (no context, no fragmentation)."""
        return self.base + self.lora + self.activations + self.transient + self.vae

    @property
    def total(self):
        return self.allocated + self.fixed


def peak_breakdown(config, quantize, gradient_checkpointing, resolution, shape=None,
                   device_type="cuda", offload_blocks=0):
    """PeakEstimate of one training step with these settings (config: defaults-filled)."""
    shape = shape or config_shape(config)
    family = memory_model(config)
    memory = estimate_memory(config, quantize, shape)
    model, train = config["model"], config["train"]
    blocks = block_bytes(family, shape[0], quantize, model["dtype"])
    offload_blocks = min(offload_blocks, len(blocks))
    offloaded = offloaded_bytes(blocks, offload_blocks)
    activations = family.activation_bytes(shape[0], resolution, train["batch_size"], gradient_checkpointing,
                                          train["dtype"], model["dtype"], recomputed=offload_blocks)
    resident = family.resident_parameters(shape[0]) * bytes_per_value(model["dtype"])
    fixed = CUDA_CONTEXT + FRAMEWORK if device_type == "cuda" else 0
    return PeakEstimate(quantize, bool(gradient_checkpointing), resolution, memory.base_bytes - offloaded,
                        memory.lora_bytes, activations, family.transient_bytes(shape[0], quantize),
                        resident, fixed, offload_blocks, offloaded)


def estimate_peak(config, quantize, gradient_checkpointing, resolution, offload_blocks=0):
    """Estimated peak bytes on a CUDA device of one training step."""
    return peak_breakdown(config, quantize, gradient_checkpointing, resolution,
                          offload_blocks=offload_blocks).total


def fits(estimate_bytes, device_bytes):
    return estimate_bytes <= device_bytes * (1 - HEADROOM)
