"""Qwen-Image's memory model (core/families/base.py MemoryModel), FLUX.1's by analogy: its
blocks are the same double-stream MMDiT block (attention over image + text tokens, an MLP of 4x
the width and a 6-way modulation per stream), so FLUX.1's calibrated bytes per token and hidden
unit (parts/mmdit_memory.py) apply per block; Qwen-Image has 60 such blocks of width 3072 and no single
blocks. Text tokens: the batch is cut to its longest caption (text.py), counted as 256 (FLUX.1's
memory model gives a model without guidance, schnell, 256: `guidance` False in the shape).

Against musubi-tuner's published figures (docs/qwen_image.md, 1024 px, batch 1, bf16, gradient
checkpointing): 42 GB unquantized, 30 GB with fp8 (docs/qwen-image.md compares ours)."""
import functools
import re

from ...dtypes import bytes_per_value
from ..parts.mmdit_memory import MMDiTMemory, block_linear_parameters
from ..parts.model_shape import transformer_shape

QWEN25_VL_7B_PARAMETERS = 8_292_166_656  # Qwen2.5-VL-7B-Instruct (language model and vision tower)


@functools.cache
def _reference():
    """(Qwen-Image's transformer config, its parameter count, the VAE's), from diffusers' classes
    at their defaults (Qwen/Qwen-Image's sizes), built on the meta device."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer, vae = QwenImageTransformer2DModel(), AutoencoderKLQwenImage()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return dict(transformer.config), count(transformer), count(vae)


def _shape_of(config, parameters):
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return {"num_layers": config["num_layers"], "num_single_layers": 0, "hidden": hidden,
            "mlp": 4 * hidden, "parameters": parameters, "guidance": False}


@functools.lru_cache(maxsize=8)
def _lora_linears(hidden):
    """(in, out) of each linear LORA_TARGETS puts a LoRA on in one block (diffusers' own block on
    the meta device, matched as peft matches target_modules)."""
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    from . import LORA_TARGETS

    with torch.device("meta"):
        block = QwenImageTransformerBlock(hidden, 1, hidden)
    return [(m.in_features, m.out_features) for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, "transformer_blocks.0." + name)]


class QwenImageMemory(MMDiTMemory):
    quantize_modes = ("none", "fp8", "int8", "nf4")
    default_source = "Qwen-Image (no local model file read)"

    def shape(self, model):
        from .files import transformer_config

        def shape_of(config, parameters):
            shape = _shape_of(config, parameters)
            return {**shape, "quantizable": block_linear_parameters(shape)}  # FLUX.1's double-block count fits

        reference = lambda: _reference()[:2]  # noqa: E731
        return transformer_shape(model, shape_of, lambda tensors, metadata: transformer_config(tensors),
                                 reference, self.default_source)

    def lora_parameters(self, shape, network):
        return network["linear"] * shape["num_layers"] * sum(i + o for i, o in _lora_linears(shape["hidden"]))

    def transient_bytes(self, shape, quantize):
        """fp8, int8, nf4: one block linear's bf16 copy at a time (bitsandbytes dequantizes per
        call too); the widest is the MLP's (d x 4d)."""
        return shape["hidden"] * shape["mlp"] * 2 if quantize in ("fp8", "int8", "nf4") else 0

    def resident_parameters(self, shape):
        return _reference()[2]  # the VAE stays on the device for sample images

    def text_encoder_note(self, dtype):
        gib = QWEN25_VL_7B_PARAMETERS * bytes_per_value(dtype) / 2**30
        return (f"text encoder: Qwen2.5-VL 7B ({gib:.2f} GiB) is on the device only while the captions "
                "are encoded, not during training.")
