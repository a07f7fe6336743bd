"""Z-Image's memory model (core/families/base.py MemoryModel): its shapes, its LoRA, the
activations one training step keeps, read by core/memory for the estimate, the fit and auto.

Shapes: Tongyi-MAI/Z-Image's transformer is diffusers' ZImageTransformer2DModel at its defaults:
width 3840 (30 heads x 128), 30 main layers over image + text tokens, two noise refiners over
the image tokens and two context refiners over the text tokens, a SwiGLU feed-forward of 10240;
6.15 B parameters, 6.14 B of them in the blocks' linears (what fp8 stores in one byte). Text:
Qwen3-4B's hidden states of the caption's own tokens, counted as TEXT_TOKENS.

Activations, measured (benchmarks/activation_memory.py zimage: width 3840, 1 and 2 main layers
with one refiner of each kind, 256 image + 64 text tokens; peak RSS growth of the second step):

| precision | checkpointing | 1 + 1 blocks | 2 + 1 blocks | per block | rest |
|---|---|---|---|---|---|
| float32 | off | 236.6 MiB | 342.4 MiB | 90.3 B/token/unit | 21.4 |
| float32 | on | 139.0 MiB | 143.7 MiB | 4 (its input) | 20.3 |
| bf16 autocast | off | 198.3 MiB | 288.7 MiB | 77.1 | 15.0 |
| bf16 autocast | on | | 118.2 MiB | 2 (its input) | 17.8 |

BLOCK_SAVED is the per-block column, WORKING the rest (backward's working memory, the embedders,
the recomputed block's own saved tensors counted apart); the estimate is within 2% of every
row. A refiner reads half the tokens a main layer does (image or text only), so a pair of
refiners counts as one main layer.

Qwen3-4B (the text encoder) is not counted in a step: it encodes the captions before the
transformer moves to the device and is freed."""
import functools
import re

from ...dtypes import bytes_per_value
from ..base import MemoryModel
from ..parts.autoencoder import AE_PARAMETERS  # Z-Image decodes with FLUX.1's ae
from ..parts.model_shape import transformer_shape

BLOCK_SAVED = {"fp32": 90.3, "mixed": 77.1}   # bytes per token per hidden unit, per block (measured)
WORKING = {"fp32": 21.0, "mixed": 16.5}
TEXT_TOKENS = 256          # captions are cut to their own length (up to 512): a long caption
ADALN_WIDTH = 256          # the modulation's input (diffusers' ADALN_EMBED_DIM)


def block_weights(shape):
    """(noise refiner, context refiner, main layer) linear weights: attention q, k, v, out
    (4 d^2), SwiGLU w1, w2, w3 (3 d h), and the 4-way modulation of all but the context refiner."""
    d, h = shape["hidden"], shape["mlp"]
    plain = 4 * d * d + 3 * d * h
    modulated = plain + min(d, ADALN_WIDTH) * 4 * d
    return modulated, plain, modulated


def shape_of(config, parameters):
    """The shape dict of a ZImageTransformer2DModel config with `parameters` weights."""
    shape = {"num_layers": config["n_layers"], "refiner_layers": config["n_refiner_layers"],
             "hidden": config["dim"], "mlp": int(config["dim"] / 3 * 8), "parameters": parameters,
             "text_tokens": TEXT_TOKENS}
    noise, context, main = block_weights(shape)
    shape["quantizable"] = shape["refiner_layers"] * (noise + context) + shape["num_layers"] * main
    return shape


@functools.cache
def _reference():
    """(Z-Image's transformer config, its parameter count), from diffusers' class at its defaults
    (Tongyi-MAI/Z-Image's sizes), built on the meta device."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
    return dict(transformer.config), sum(p.numel() for p in transformer.parameters())


@functools.lru_cache(maxsize=8)
def _lora_linears(hidden, mlp):
    """(in, out) of each linear LORA_TARGETS puts a LoRA on, in one main layer (diffusers' own
    block on the meta device, matched as peft matches target_modules); refiners have the same."""
    import torch
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from . import LORA_TARGETS

    with torch.device("meta"):
        block = ZImageTransformerBlock(0, hidden, hidden // 128, hidden // 128, 1e-5, True)
    return [(m.in_features, m.out_features) for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, "layers.0." + name)]


class ZImageMemory(MemoryModel):
    quantize_modes = ("none", "fp8", "int8", "nf4")
    default_source = "Z-Image (no local model file read)"
    shape_of = staticmethod(shape_of)  # of a transformer config (benchmarks/activation_memory.py)

    def shape(self, model):
        from .single_files import transformer_config, transformer_prefix

        def file_config(tensors, metadata):
            prefix = transformer_prefix(tensors)
            return None if prefix is None else transformer_config(tensors, metadata, prefix)

        return transformer_shape(model, shape_of, file_config, _reference, self.default_source)

    def lora_parameters(self, shape, network):
        from ...lora.inject import adapter_parameters

        per_block = sum(adapter_parameters(i, o, network) for i, o in _lora_linears(shape["hidden"], shape["mlp"]))
        return per_block * (shape["num_layers"] + 2 * shape["refiner_layers"])

    def block_parameters(self, shape):
        noise, context, main = block_weights(shape)
        return [noise] * shape["refiner_layers"] + [context] * shape["refiner_layers"] + [main] * shape["num_layers"]

    def tokens(self, shape, resolution):
        return (resolution // 16) ** 2 + shape.get("text_tokens", TEXT_TOKENS)

    def activation_bytes(self, shape, resolution, batch_size, checkpointing, train_dtype="bf16",
                         model_dtype="bf16", recomputed=0):
        mode = "fp32" if train_dtype == "fp32" else "mixed"
        layers, refiners = shape["num_layers"], shape["refiner_layers"]
        blocks = layers + refiners  # a pair of refiners reads the tokens one main layer does
        # offloading takes the last blocks: main layers first, then refiners (half the tokens each)
        recomputed = blocks if checkpointing else min(recomputed, layers) + max(0, recomputed - layers) / 2
        recomputed = min(recomputed, blocks)
        per_token = ((blocks - recomputed) * BLOCK_SAVED[mode] + recomputed * bytes_per_value(model_dtype)
                     + (BLOCK_SAVED[mode] if recomputed else 0) + WORKING[mode])
        return batch_size * self.tokens(shape, resolution) * shape["hidden"] * per_token

    def transient_bytes(self, shape, quantize):
        """fp8, int8, nf4: one block linear's bf16 copy at a time (bitsandbytes dequantizes per call
        too); the widest is a SwiGLU's (d x h)."""
        return shape["hidden"] * shape["mlp"] * 2 if quantize in ("fp8", "int8", "nf4") else 0

    def resident_parameters(self, shape):
        return AE_PARAMETERS  # the VAE stays on the device for sample images

