"""FLUX.1's memory model (core/families/base.py MemoryModel): its shapes, the LoRA it carries,
the activations one training step keeps, read by core/memory for the estimate, the fit and auto.

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

T5-XXL and CLIP-L are not counted in a step: they encode the captions once before the
transformer moves to the device, then are freed (free_text_encoders)."""
import functools
import glob
import json
import math
import os
import re

from ...dtypes import bytes_per_value
from ...lora.inject import adapter_parameters
from ..base import MemoryModel

# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json): 19 double
# blocks, 38 single blocks, hidden 24 heads x 128 = 3072, MLP 4 x 3072 = 12288; guidance-distilled
# (dev), so it reads 512 T5 tokens (schnell: 256).
FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "hidden": 3072, "mlp": 12288,
            "parameters": 11_901_408_320, "guidance": True}

# Bytes per token per unit of hidden width (see the module's docstring for the calibration).
BLOCK_SAVED = {"fp32": 69.6, "mixed": 45.0}   # all of a block's saved activations
WORKING = {"fp32": 42.0, "mixed": 47.0}       # backward's working memory, and the head and tail
TEXT_TOKENS = {True: 512, False: 256}         # dev (guidance) / schnell T5 tokens
VAE_PARAMETERS = 83_819_683      # FLUX.1 AutoencoderKL (ae.safetensors)
# 1 byte (fp8) or less per weight is stored, computed in bf16: each block linear's weight is
# dequantized to a bf16 copy per call (forward, and again in backward), freed after the call.
COMPUTE_BYTES = 2


def block_linear_parameters(shape):
    """Weights of every nn.Linear inside transformer_blocks and single_transformer_blocks: what
    fp8 (fp8.is_block_linear) and bitsandbytes store quantized. A double block: q, k, v, out for
    both streams (8 d^2), two MLPs in and out (4 d m), two modulation linears d -> 6d (12 d^2); a
    single block: q, k, v (3 d^2), proj_mlp (d m), proj_out ((d + m) d), modulation d -> 3d
    (3 d^2). FLUX.1-dev: 11.83 B of its 11.90 B parameters; the rest (embedders, final norm and
    projection, biases) stays in model.dtype."""
    d, m = shape["hidden"], shape["mlp"]
    return (shape["num_layers"] * (20 * d * d + 4 * d * m)
            + shape["num_single_layers"] * (7 * d * d + 2 * d * m))


def lora_linears(shape):
    """(in, out) of each linear that LORA_TARGETS puts a LoRA on, for one double and one single
    block: diffusers' own blocks, built on the meta device (no memory), matched the way peft
    matches target_modules."""
    return _lora_linears(shape["hidden"], shape["mlp"])


@functools.lru_cache(maxsize=8)  # the fit table asks for the same shape dozens of times
def _lora_linears(hidden, mlp):
    import torch
    from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)

    from . import LORA_TARGETS

    with torch.device("meta"):  # one head of `hidden`: the linears do not depend on the heads
        blocks = {"transformer_blocks.0.": FluxTransformerBlock(hidden, 1, hidden),
                  "single_transformer_blocks.0.": FluxSingleTransformerBlock(
                      hidden, 1, hidden, mlp_ratio=mlp / hidden)}
    return {prefix: [(m.in_features, m.out_features) for name, m in block.named_modules()
                     if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, prefix + name)]
            for prefix, block in blocks.items()}


def image_tokens(resolution):
    """Packed latent tokens of a resolution x resolution image: VAE /8, then 2x2 patches."""
    return (resolution // 16) ** 2


def _shape_of(config, parameters):
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    shape = {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"],
             "hidden": hidden, "mlp": int(hidden * config.get("mlp_ratio", 4.0)),
             "parameters": parameters, "guidance": bool(config.get("guidance_embeds", True))}
    return {**shape, "quantizable": block_linear_parameters(shape)}


def model_shape(model_path=None, transformer_path=None):
    """(shape dict, description) of the transformer: from a single transformer file's header
    when one is given (BFL or diffusers keys, bf16 or fp8: the shapes, not the stored dtype,
    count), else from a local diffusers folder; FLUX.1-dev's when there is neither (the plan
    can run before any model is downloaded)."""
    from .files import is_scale_key, read_header, transformer_config

    if transformer_path and os.path.isfile(transformer_path):
        tensors, metadata = read_header(transformer_path)
        parameters = sum(math.prod(v["shape"]) for k, v in tensors.items() if not is_scale_key(k))
        return _shape_of(transformer_config(tensors, metadata), parameters), transformer_path
    config_path = os.path.join(model_path or "", "transformer", "config.json")
    if not model_path or not os.path.isfile(config_path):
        return {**FLUX_DEV, "quantizable": block_linear_parameters(FLUX_DEV)}, FluxMemory.default_source
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    files = glob.glob(os.path.join(model_path, "transformer", "*.safetensors"))
    parameters = sum(math.prod(info["shape"]) for path in files for info in read_header(path)[0].values())
    return _shape_of(config, parameters), config_path


class FluxMemory(MemoryModel):
    quantize_modes = ("none", "fp8", "int8", "nf4")
    default_source = "FLUX.1-dev (no local model folder read)"

    def shape(self, model):
        from ..builtin import BUILTIN_MODELS, resolve_model_path

        path = model.get("path")
        if path in BUILTIN_MODELS:
            path = resolve_model_path(path)
        return model_shape(path, model.get("transformer_path"))

    def lora_parameters(self, shape, network):
        """The adapter's parameters on each targeted linear (core.lora's adapter_parameters: a
        LoRA of rank r on in -> out has r x (in + out); LoKr, LoHa, DoRA as peft builds them)."""
        per_block = {prefix: sum(adapter_parameters(inputs, outputs, network) for inputs, outputs in linears)
                     for prefix, linears in lora_linears(shape).items()}
        return (shape["num_layers"] * per_block["transformer_blocks.0."]
                + shape["num_single_layers"] * per_block["single_transformer_blocks.0."])

    def activation_bytes(self, shape, resolution, batch_size, checkpointing, train_dtype="bf16",
                         model_dtype="bf16"):
        mode = "fp32" if train_dtype == "fp32" else "mixed"
        tokens = batch_size * (image_tokens(resolution) + TEXT_TOKENS[shape.get("guidance", True)])
        blocks = shape["num_layers"] + shape["num_single_layers"]
        if checkpointing:
            per_token = blocks * bytes_per_value(model_dtype) + BLOCK_SAVED[mode] + WORKING[mode]
        else:
            per_token = blocks * BLOCK_SAVED[mode] + WORKING[mode]
        return tokens * shape["hidden"] * per_token

    def transient_bytes(self, shape, quantize):
        """fp8 (Float8Linear) saves only the fp8 weight for backward and upcasts it again there;
        bitsandbytes dequantizes per call too. The widest layer is single blocks' proj_out."""
        d, m = shape["hidden"], shape["mlp"]
        return (d + m) * d * COMPUTE_BYTES if quantize in ("fp8", "int8", "nf4") else 0

    def resident_parameters(self, shape):
        return VAE_PARAMETERS  # the trainer keeps the VAE on the device for sample images
