"""nf4 and int8 frozen transformers from any loaded one (a single file or a folder): the block
linears become bitsandbytes layers one at a time, so the full-precision copy shrinks as it goes.
diffusers' own BitsAndBytesConfig path needs a diffusers folder; ComfyUI's files have none."""
import torch

from .fp8 import BLOCK_PREFIXES, is_block_linear, replace_block_linears


def quantize_block_linears(model, mode, compute_dtype, device, prefixes=BLOCK_PREFIXES):
    """Block linears (under the blocks' `prefixes`, as fp8.is_block_linear names them) ->
    bitsandbytes NF4 (mode "nf4") or LLM.int8 ("int8") layers, quantized as they move to `device`
    (CUDA; bitsandbytes 0.45+ also quantizes on the CPU, slowly)."""
    import bitsandbytes as bnb

    names = [name for name, module in model.named_modules()
             if is_block_linear(name, prefixes) and type(module) is torch.nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent, linear = model.get_submodule(parent_name), model.get_submodule(name)
        weight = linear.weight.data.to(compute_dtype)
        if mode == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                        has_fp16_weights=False, device="meta")
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, layer.to(device))
        del linear, weight
    return names


def quantize_loaded(transformer, quantize, prefixes=BLOCK_PREFIXES):
    """model.quantize on a transformer loaded in full precision: its block linears in fp8
    (parts/fp8.py) or bitsandbytes nf4/int8 (on the GPU where there is one, as FLUX.1's files
    are); "none" leaves it as it is. The names of the layers it changed."""
    dtype = transformer.dtype
    if quantize == "fp8":
        return replace_block_linears(transformer, dtype, convert=True, prefixes=prefixes)
    if quantize in ("nf4", "int8"):
        return quantize_block_linears(transformer, quantize, dtype,
                                      "cuda" if torch.cuda.is_available() else "cpu", prefixes)
    return []
