"""FLUX.2 klein's memory model (core/families/base.py MemoryModel): its shapes, its LoRA, the
activations one training step keeps, read by core/memory for the estimate, the fit and auto.

Shapes, from diffusers 0.42.1's Flux2Transformer2DModel with the model cards' configs
(black-forest-labs/FLUX.2-klein-base-4B and -9B transformer/config.json): klein 4B has 5
double-stream and 20 single-stream blocks of width 3072 (24 heads x 128), klein 9B 8 and 24 of
width 4096 (32 heads); both a SwiGLU feed-forward of 3x the width and no guidance embedding.
A double block's linears are 8 d^2 of attention (image and text q, k, v, out) and 2 x 3 d m of
feed-forward; a single block's the fused qkv + MLP input (d x (3d + 2m)) and output ((d + m) x d).
The modulations are shared by all blocks (outside them). klein 4B: 3.88 B parameters, 3.68 B in
the blocks' linears; 9B: 9.08 B and 8.72 B. Text: Qwen3's hidden states of the whole
512-token padded caption (Flux2KleinPipeline's max_sequence_length).

Activations, measured (benchmarks/activation_memory.py flux2: width 3072, double + single
blocks as below, 256 image + 64 text tokens; peak RSS growth of the second step):

| precision | checkpointing | 1 + 1 blocks | 2 + 1 | 1 + 2 | per block | rest |
|---|---|---|---|---|---|---|
| float32 | off | 207.1 MiB | 288.9 MiB | 285.3 MiB | 87.4 double, 83.4 single | 50.1 |
| float32 | on | 131.4 MiB | 135.6 MiB | | 4 (its input) | 46.8 |
| bf16 autocast | off | 132.8 MiB | 183.9 MiB | 179.1 MiB | 54.5 double, 49.4 single | 37.7 |

in bytes per token and hidden unit. BLOCK_SAVED is the mean of the two kinds, WORKING the rest
(backward's working memory, the embedders, the recomputed block's own saved tensors counted
apart); the estimate is within 2% of every row.

The Qwen3 text encoder (4B, or 8B for klein 9B) is not counted in a step: it encodes the
captions before the transformer moves to the device and is freed."""
import functools
import os
import re

from ...dtypes import bytes_per_value
from ..base import MemoryModel
from ..parts.model_shape import transformer_shape

BLOCK_SAVED = {"fp32": 85.4, "mixed": 52.0}   # bytes per token per hidden unit, per block (measured)
WORKING = {"fp32": 48.5, "mixed": 37.5}
TEXT_TOKENS = 512          # captions are padded to 512 tokens
# the two released sizes (model cards' transformer/config.json), for the plan without a model
KLEIN = {"4B": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "attention_head_dim": 128,
                "mlp_ratio": 3.0, "joint_attention_dim": 7680},
         "9B": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "attention_head_dim": 128,
                "mlp_ratio": 3.0, "joint_attention_dim": 12288}}


def block_weights(shape):
    """(double block, single block) linear weights."""
    d, m = shape["hidden"], shape["mlp"]
    return 8 * d * d + 6 * d * m, 4 * d * d + 3 * d * m


def shape_of(config, parameters):
    """The shape dict of a Flux2Transformer2DModel config with `parameters` weights."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    shape = {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"],
             "hidden": hidden, "mlp": int(hidden * config.get("mlp_ratio", 3.0)), "parameters": parameters,
             "text_tokens": TEXT_TOKENS}
    double, single = block_weights(shape)
    shape["quantizable"] = shape["num_layers"] * double + shape["num_single_layers"] * single
    return shape


@functools.cache
def reference(size="4B"):
    """(klein's transformer config, its parameter count), diffusers' class on the meta device."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**KLEIN[size], guidance_embeds=False)
    return dict(transformer.config), sum(p.numel() for p in transformer.parameters())


@functools.lru_cache(maxsize=8)
def _lora_linears(hidden, mlp_ratio):
    """{block prefix: [(in, out)]} of the linears LORA_TARGETS puts a LoRA on in one double and
    one single block (diffusers' own blocks on the meta device, matched as peft matches)."""
    import torch
    from diffusers.models.transformers.transformer_flux2 import (Flux2SingleTransformerBlock,
                                                                 Flux2TransformerBlock)

    from . import LORA_TARGETS

    with torch.device("meta"):
        blocks = {"transformer_blocks.0.": Flux2TransformerBlock(hidden, hidden // 128, 128, mlp_ratio),
                  "single_transformer_blocks.0.": Flux2SingleTransformerBlock(hidden, hidden // 128, 128, mlp_ratio)}
    return {prefix: [(m.in_features, m.out_features) for name, m in block.named_modules()
                     if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, prefix + name)]
            for prefix, block in blocks.items()}


class Flux2Memory(MemoryModel):
    quantize_modes = ("none", "fp8", "int8", "nf4")
    default_source = "FLUX.2 klein 4B (no local model folder read)"
    other_sizes = ("black-forest-labs/FLUX.2-klein-base-9B",)
    shape_of = staticmethod(shape_of)  # of a transformer config (benchmarks/activation_memory.py)

    def shape(self, model):
        """A local folder's shapes; without one, klein 9B's where model.path names it (as the
        hub's black-forest-labs/FLUX.2-klein-base-9B does), else klein 4B's."""
        size = "9B" if "9b" in os.path.basename(str(model.get("path") or "")).lower() else "4B"
        return transformer_shape(model, shape_of, lambda tensors, metadata: None, lambda: reference(size),
                                 f"FLUX.2 klein {size} (no local model folder read)")

    def lora_parameters(self, shape, network):
        from ...lora.inject import adapter_parameters

        linears = _lora_linears(shape["hidden"], shape["mlp"] / shape["hidden"])
        per_block = {prefix: sum(adapter_parameters(i, o, network) for i, o in pairs) for prefix, pairs in linears.items()}
        return (shape["num_layers"] * per_block["transformer_blocks.0."]
                + shape["num_single_layers"] * per_block["single_transformer_blocks.0."])

    def block_parameters(self, shape):
        double, single = block_weights(shape)
        return [double] * shape["num_layers"] + [single] * shape["num_single_layers"]

    def tokens(self, shape, resolution):
        return (resolution // 16) ** 2 + shape.get("text_tokens", TEXT_TOKENS)

    def activation_bytes(self, shape, resolution, batch_size, checkpointing, train_dtype="bf16",
                         model_dtype="bf16", recomputed=0):
        mode = "fp32" if train_dtype == "fp32" else "mixed"
        blocks = shape["num_layers"] + shape["num_single_layers"]
        recomputed = blocks if checkpointing else min(recomputed, blocks)
        per_token = ((blocks - recomputed) * BLOCK_SAVED[mode] + recomputed * bytes_per_value(model_dtype)
                     + (BLOCK_SAVED[mode] if recomputed else 0) + WORKING[mode])
        return batch_size * self.tokens(shape, resolution) * shape["hidden"] * per_token

    def transient_bytes(self, shape, quantize):
        """fp8, int8, nf4: one block linear's bf16 copy at a time (bitsandbytes dequantizes per
        call too); the widest is a single block's fused input."""
        d, m = shape["hidden"], shape["mlp"]
        return d * (3 * d + 2 * m) * 2 if quantize in ("fp8", "int8", "nf4") else 0

    def resident_parameters(self, shape):
        return VAE_PARAMETERS  # the VAE stays on the device for sample images


VAE_PARAMETERS = 84_046_115  # AutoencoderKLFlux2 at its defaults (FLUX.2's VAE)
