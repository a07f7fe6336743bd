"""FLUX.1's memory model (core/families/base.py MemoryModel): its shapes, the LoRA it carries,
the activations one training step keeps, read by core/memory for the estimate, the fit and auto.
The activations of its double-stream and single blocks are parts/mmdit_memory.py's calibration, measured
on FLUX.1's blocks.

T5-XXL and CLIP-L are not counted in a step: they encode the captions once before the
transformer moves to the device, then are freed (free_text_encoders)."""
import functools
import glob
import json
import math
import os
import re

from ...lora.inject import adapter_parameters
from ..parts.autoencoder import AE_PARAMETERS
from ..parts.mmdit_memory import COMPUTE_BYTES, MMDiTMemory, block_linear_parameters  # noqa: F401 (tests read it here)

# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json): 19 double
# blocks, 38 single blocks, hidden 24 heads x 128 = 3072, MLP 4 x 3072 = 12288; guidance-distilled
# (dev), so it reads 512 T5 tokens (schnell: 256).
FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "hidden": 3072, "mlp": 12288,
            "parameters": 11_901_408_320, "guidance": True}

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
    from ..parts.files import is_scale_key, read_header
    from .file_layout import transformer_config

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


class FluxMemory(MMDiTMemory):
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

    def transient_bytes(self, shape, quantize):
        """fp8 (Float8Linear) saves only the fp8 weight for backward and upcasts it again there;
        bitsandbytes dequantizes per call too. The widest layer is single blocks' proj_out."""
        d, m = shape["hidden"], shape["mlp"]
        return (d + m) * d * COMPUTE_BYTES if quantize in ("fp8", "int8", "nf4") else 0

    def resident_parameters(self, shape):
        return AE_PARAMETERS  # the trainer keeps the VAE on the device for sample images
