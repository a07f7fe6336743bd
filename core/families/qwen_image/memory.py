"""Qwen-Image's memory model (core/families/base.py MemoryModel), FLUX.1's by analogy: its
blocks are the same double-stream MMDiT block (attention over image + text tokens, an MLP of 4x
the width and a 6-way modulation per stream), so FLUX.1's calibrated bytes per token and hidden
unit (flux/memory.py) apply per block; Qwen-Image has 60 such blocks of width 3072 and no single
blocks. Text tokens: the batch is cut to its longest caption (text.py), counted as 256 (FLUX.1's
memory model gives a model without guidance, schnell, 256: `guidance` False in the shape).

Against musubi-tuner's published figures (docs/qwen_image.md, 1024 px, batch 1, bf16, gradient
checkpointing): 42 GB unquantized, 30 GB with fp8 (docs/qwen-image.md compares ours)."""
import functools
import json
import math
import os
import re

from ...dtypes import bytes_per_value
from ..flux.memory import FluxMemory, block_linear_parameters

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


class QwenImageMemory(FluxMemory):
    quantize_modes = ("none", "fp8")
    default_source = "Qwen-Image (no local model file read)"

    def shape(self, model):
        from ..builtin import BUILTIN_MODELS, resolve_model_path
        from ..flux.files import is_scale_key, read_header
        from .files import transformer_config

        path, file = model.get("path"), model.get("transformer_path")
        if path in BUILTIN_MODELS:
            path = resolve_model_path(path)
        config_path = os.path.join(path or "", "transformer", "config.json")
        if file and os.path.isfile(file):
            tensors, _ = read_header(file)
            parameters = sum(math.prod(v["shape"]) for k, v in tensors.items() if not is_scale_key(k))
            shape, source = _shape_of(transformer_config(tensors), parameters), file
        elif path and os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            shape, source = _shape_of(config, self._parameters(path)), config_path
        else:
            config, parameters, _ = _reference()
            shape, source = _shape_of(config, parameters), self.default_source
        shape["quantizable"] = block_linear_parameters(shape)  # FLUX.1's double-block count fits
        return shape, source

    @staticmethod
    def _parameters(folder):
        import glob

        from ..flux.files import read_header

        files = glob.glob(os.path.join(folder, "transformer", "*.safetensors"))
        return sum(math.prod(info["shape"]) for path in files for info in read_header(path)[0].values())

    def lora_parameters(self, shape, network):
        return network["linear"] * shape["num_layers"] * sum(i + o for i, o in _lora_linears(shape["hidden"]))

    def transient_bytes(self, shape, quantize):
        """One block linear's bf16 copy at a time; the widest is the MLP's (d x 4d)."""
        return shape["hidden"] * shape["mlp"] * 2 if quantize == "fp8" else 0

    def resident_parameters(self, shape):
        return _reference()[2]  # the VAE stays on the device for sample images

    def text_encoder_note(self, dtype):
        gib = QWEN25_VL_7B_PARAMETERS * bytes_per_value(dtype) / 2**30
        return (f"text encoder: Qwen2.5-VL 7B ({gib:.2f} GiB) is on the device only while the captions "
                "are encoded, not during training.")
