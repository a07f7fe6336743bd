"""The memory of a double-stream (MMDiT) transformer's training step, per block: FLUX.1's double and
single blocks measured, and applied to the models built of the same block (Qwen-Image's 60 double
blocks). A family's memory model (core/families/base.py MemoryModel) subclasses MMDiTMemory with
its shapes, its LoRA and what stays resident.

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
(CUDA kernels, caching allocator) is checked by benchmarks/gpu_memory.py."""
from ...dtypes import bytes_per_value
from ..base import MemoryModel

# Bytes per token per unit of hidden width (see the module's docstring for the calibration).
BLOCK_SAVED = {"fp32": 69.6, "mixed": 45.0}   # all of a block's saved activations
WORKING = {"fp32": 42.0, "mixed": 47.0}       # backward's working memory, and the head and tail
TEXT_TOKENS = {True: 512, False: 256}         # dev (guidance) / schnell T5 tokens
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


def image_tokens(resolution):
    """Packed latent tokens of a resolution x resolution image: VAE /8, then 2x2 patches."""
    return (resolution // 16) ** 2


class MMDiTMemory(MemoryModel):
    """activation_bytes of a model of MMDiT blocks; `shape` has num_layers (double blocks),
    num_single_layers, hidden, mlp and guidance (512 text tokens with it, 256 without)."""

    def activation_bytes(self, shape, resolution, batch_size, checkpointing, train_dtype="bf16",
                         model_dtype="bf16", recomputed=0):
        mode = "fp32" if train_dtype == "fp32" else "mixed"
        tokens = batch_size * self.tokens(shape, resolution)
        blocks = shape["num_layers"] + shape["num_single_layers"]
        recomputed = blocks if checkpointing else min(recomputed, blocks)
        # a recomputed block keeps its input; one at a time is rebuilt whole in backward
        per_token = ((blocks - recomputed) * BLOCK_SAVED[mode] + recomputed * bytes_per_value(model_dtype)
                     + (BLOCK_SAVED[mode] if recomputed else 0) + WORKING[mode])
        return tokens * shape["hidden"] * per_token

    def tokens(self, shape, resolution):
        return image_tokens(resolution) + TEXT_TOKENS[shape.get("guidance", True)]

    def block_parameters(self, shape):
        """The double blocks' linears, then the single blocks' (block_linear_parameters' terms)."""
        d, m = shape["hidden"], shape["mlp"]
        return ([20 * d * d + 4 * d * m] * shape["num_layers"]
                + [7 * d * d + 2 * d * m] * shape["num_single_layers"])

