"""How much accelerator memory a chosen rank and optimizer cost (docs/training-guide.md, section 1: "show the
memory the chosen rank costs"). An estimate from shapes, not a measurement: activations, which
grow with resolution and batch size, come on top."""
import functools
import glob
import json
import math
import os
import re
from dataclasses import dataclass

from ..dtypes import bytes_per_value

# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json): 19 double
# blocks, 38 single blocks, hidden 24 heads x 128 = 3072, MLP 4 x 3072 = 12288; guidance-distilled
# (dev), so it reads 512 T5 tokens (schnell: 256).
FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "hidden": 3072, "mlp": 12288,
            "parameters": 11_901_408_320, "guidance": True}


def block_linear_parameters(shape):
    """Weights of every nn.Linear inside transformer_blocks and single_transformer_blocks: what
    fp8 (core.families.flux.fp8.is_block_linear) and bitsandbytes store quantized. A double
    block: q, k, v, out for both streams (8 d^2), two MLPs in and out (4 d m), two modulation
    linears d -> 6d (12 d^2); a single block: q, k, v (3 d^2), proj_mlp (d m), proj_out
    ((d + m) d), modulation d -> 3d (3 d^2). FLUX.1-dev: 11.83 B of its 11.90 B parameters; the
    rest (embedders, final norm and projection, biases) stays in model.dtype."""
    d, m = shape["hidden"], shape["mlp"]
    return (shape["num_layers"] * (20 * d * d + 4 * d * m)
            + shape["num_single_layers"] * (7 * d * d + 2 * d * m))


def lora_linears(shape):
    """(in, out) of each linear that the FLUX family's LORA_TARGETS puts a LoRA on, for one double
    and one single block: diffusers' own blocks, built on the meta device (no memory), matched
    the way peft matches target_modules."""
    return _lora_linears(shape["hidden"], shape["mlp"])


@functools.lru_cache(maxsize=8)  # the fit table asks for the same shape dozens of times
def _lora_linears(hidden, mlp):
    import torch
    from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)

    from ..families.flux import LORA_TARGETS

    with torch.device("meta"):  # one head of `hidden`: the linears do not depend on the heads
        blocks = {"transformer_blocks.0.": FluxTransformerBlock(hidden, 1, hidden),
                  "single_transformer_blocks.0.": FluxSingleTransformerBlock(
                      hidden, 1, hidden, mlp_ratio=mlp / hidden)}
    return {prefix: [(m.in_features, m.out_features) for name, m in block.named_modules()
                     if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, prefix + name)]
            for prefix, block in blocks.items()}


def lora_parameters(rank, shape):
    """A LoRA of rank r on a linear (in -> out) has r x (in + out) parameters (A and B)."""
    per_block = {prefix: sum(inputs + outputs for inputs, outputs in linears)
                 for prefix, linears in lora_linears(shape).items()}
    return rank * (shape["num_layers"] * per_block["transformer_blocks.0."]
                   + shape["num_single_layers"] * per_block["single_transformer_blocks.0."])


# Bytes per trainable parameter beyond its float32 weight and gradient (4 + 4 bytes).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,        # two float32 moments
    "adamw8bit": 2,    # two 8-bit moments
    "prodigy": 16,     # two moments, the initial weights and its step-size state, float32
    "adafactor": None,  # factored second moment: see state_bytes
    "lion": 1,         # one 8-bit moment (bitsandbytes Lion8bit)
}


def state_bytes(optimizer, rank):
    """Optimizer-state bytes per LoRA parameter. Adafactor keeps one float per row and one per
    column of each matrix: for a rank x n LoRA matrix about 4 / rank bytes per parameter."""
    if optimizer == "adafactor":
        return 4 / rank
    return OPTIMIZER_STATE_BYTES.get(optimizer, 8)


# Bytes per quantized block-linear weight: fp8 and int8 one byte (one float32 scale per tensor /
# per output row, negligible); nf4 half a byte plus a float32 absmax per 64-value block
# (bitsandbytes' default blocksize, no double quantization as core.families.flux.model loads it).
QUANTIZED_BYTES = {"fp8": 1, "int8": 1, "nf4": 0.5 + 4 / 64}


def base_bytes(shape, quantize, dtype):
    """Resident bytes of the frozen transformer: quantized block linears, the rest in dtype."""
    full = bytes_per_value(dtype or "bf16")
    if quantize not in QUANTIZED_BYTES:
        return shape["parameters"] * full
    quantized = min(block_linear_parameters(shape), shape["parameters"])
    return quantized * QUANTIZED_BYTES[quantize] + (shape["parameters"] - quantized) * full


@dataclass
class MemoryEstimate:
    rank: int
    optimizer: str
    lora_parameters: int
    lora_bytes: float          # weights + gradients + optimizer states
    base_parameters: int
    base_bytes: float          # the frozen transformer in its dtype or quantization
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


def parameters(count):
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


def gigabytes(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.0f} MiB"


def _safetensors_parameters(paths):
    """Parameter count from the files' headers (safetensors reads them; no tensor is loaded)."""
    from ..families.flux.files import read_header

    return sum(math.prod(info["shape"]) for path in paths for info in read_header(path)[0].values())


def _shape_of(config, parameters):
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"],
            "hidden": hidden, "mlp": int(hidden * config.get("mlp_ratio", 4.0)),
            "parameters": parameters, "guidance": bool(config.get("guidance_embeds", True))}


def model_shape(model_path=None, transformer_path=None):
    """(shape dict, description) of the transformer: from a single transformer file's header
    when one is given (BFL or diffusers keys, bf16 or fp8: the shapes, not the stored dtype,
    count), else from a local diffusers folder; FLUX.1-dev's when there is neither (the plan
    can run before any model is downloaded)."""
    if transformer_path and os.path.isfile(transformer_path):
        from ..families.flux.files import is_scale_key, read_header, transformer_config

        tensors, metadata = read_header(transformer_path)
        parameters = sum(math.prod(v["shape"]) for k, v in tensors.items() if not is_scale_key(k))
        return _shape_of(transformer_config(tensors, metadata), parameters), transformer_path
    config_path = os.path.join(model_path or "", "transformer", "config.json")
    if not model_path or not os.path.isfile(config_path):
        return dict(FLUX_DEV), "FLUX.1-dev (no local model folder read)"
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    files = glob.glob(os.path.join(model_path, "transformer", "*.safetensors"))
    return _shape_of(config, _safetensors_parameters(files)), config_path


def config_shape(config):
    """(shape, description) of the config's transformer (model.transformer_path, model.path)."""
    from ..families.builtin import BUILTIN_MODELS, resolve_model_path

    model = config["model"]
    path = model.get("path")
    if path in BUILTIN_MODELS:
        path = resolve_model_path(path)
    return model_shape(path, model.get("transformer_path"))


def estimate_memory(config, quantize=None, shape=None):
    """MemoryEstimate for a resolved (or defaults-filled) config; quantize overrides
    model.quantize ("auto" counts as "none": the unquantized base)."""
    shape, source = shape or config_shape(config)
    rank, optimizer = config["network"]["linear"], config["train"]["optimizer"]
    lora = lora_parameters(rank, shape)
    per_parameter = 8 + state_bytes(optimizer, rank)
    base = base_bytes(shape, quantize or config["model"].get("quantize"), config["model"].get("dtype"))
    return MemoryEstimate(rank, optimizer, lora, lora * per_parameter, shape["parameters"],
                          base, source)
