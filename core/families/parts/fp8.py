"""fp8 weights kept in memory, computed in the load dtype layer by layer: the transformer's block
linears hold float8_e4m3fn weights (half of bf16's memory) and upcast them per call.

`Float8Linear` is an `nn.Linear` (peft wraps it as a LoRA `base_layer` like any Linear); its
`compute_dtype` tells peft which dtype to give the LoRA weights (peft reads it as it reads
bitsandbytes' 4-bit layers), not fp8.

Under autograd the layer saves only its fp8 weight and scale (`_FrozenFloat8Linear`) and upcasts
again in backward, so one layer's compute-dtype copy exists at a time, in forward and backward.
"""
import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def to_fp8(weight):
    """(fp8 weight, float32 scale) of a full-precision weight: one scale per tensor, the largest
    magnitude mapped to fp8's largest value."""
    weight = weight.float()
    amax = weight.abs().max()
    scale = (amax / FP8_MAX).clamp(min=1e-12) if amax > 0 else torch.tensor(1.0)
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(1).float()


def _dequantize(weight, scale, dtype):
    """The fp8 weight times its scale (one value, or one per output row) as a new `dtype` tensor:
    one copy, scaled in place."""
    weight = weight.to(dtype, copy=True)
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)
    return weight.mul_(scale.to(dtype))


def _compute_dtype(x, compute_dtype):
    """autocast's dtype where autocast is on for x's device (bf16 / fp16), else compute_dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return compute_dtype


class _FrozenFloat8Linear(torch.autograd.Function):
    """y = x W^T + b for a frozen fp8 W: saves the fp8 W and scale, upcasts again in backward."""
    # Hand-written: F.linear on the upcast W would make autograd keep that bf16 copy until backward.

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(dtype)
        return nn.functional.linear(x.to(dtype), _dequantize(weight, scale, dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.to(ctx.dtype).matmul(_dequantize(weight, scale, ctx.dtype))
            grad_input = grad_input.to(ctx.input_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).float().sum(0)
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, None, None, grad_bias, None


class Float8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 (times `weight_scale`: one value, or one per output
    row) and used in `compute_dtype`; the bias is kept in `compute_dtype`."""

    def __init__(self, in_features, out_features, bias=True, device=None,
                 compute_dtype=torch.bfloat16):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=compute_dtype)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear, compute_dtype):
        """Replaces a full-precision Linear (weights quantized with one scale per tensor)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", compute_dtype=compute_dtype)
        weight, scale = to_fp8(linear.weight.detach())
        layer.set_weight(weight, scale)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return layer

    def set_weight(self, weight, scale=None):
        """Places an fp8 weight (and its scale) as is: no full-precision copy is made."""
        if weight.dtype != FP8:
            weight, scale = to_fp8(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        scale = torch.ones(1) if scale is None else scale.detach().float().reshape(-1)
        self.weight_scale = scale.to(weight.device)

    def dequantized_weight(self, dtype=None):
        return _dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x):
        dtype = _compute_dtype(x, self.compute_dtype)
        bias = self.bias
        if self.weight.requires_grad:
            raise RuntimeError("Float8Linear's fp8 weight is frozen: it has no gradient")
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _FrozenFloat8Linear.apply(x, self.weight, self.weight_scale, bias, dtype)
        bias = None if bias is None else bias.to(dtype)   # no_grad / inference_mode: plain path
        return nn.functional.linear(x.to(dtype), self.dequantized_weight(dtype), bias)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) moves the weight but keeps it fp8 (every fp8 value is exact in bf16,
        # fp16 and fp32, so the round trip loses nothing); the compute dtype follows the cast.
        stored = self.weight.dtype
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        super()._apply(fn, recurse)
        if self.weight.dtype != stored:
            self.weight.data = self.weight.data.to(stored)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        return self

    def extra_repr(self):
        return super().extra_repr() + f", fp8, compute_dtype={self.compute_dtype}"


BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # FLUX.1's, Qwen-Image's, FLUX.2's


def is_block_linear(name, prefixes=BLOCK_PREFIXES):
    """The block linears kept in fp8: those under the blocks' `prefixes` (FLUX.1's
    transformer_blocks.* and single_transformer_blocks.* by default)."""
    return name.startswith(prefixes)


def replace_block_linears(transformer, compute_dtype, convert=False, prefixes=BLOCK_PREFIXES):
    """Every block nn.Linear of the transformer (under `prefixes`) becomes a Float8Linear: empty
    on the meta device (to be filled by a loader) or, with convert=True, quantized from the
    layer's own weight one layer at a time."""
    targets = [(name, module) for name, module in transformer.named_modules()
               if is_block_linear(name, prefixes) and type(module) is nn.Linear]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        if convert:
            layer = Float8Linear.from_linear(module, compute_dtype)
        else:
            layer = Float8Linear(module.in_features, module.out_features,
                                 bias=module.bias is not None, device="meta",
                                 compute_dtype=compute_dtype)
        setattr(parent, child, layer)
    return [name for name, _ in targets]
