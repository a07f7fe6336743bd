"""Block offloading (train.offload_blocks): the frozen weights of the trainable model's last N
blocks live in host memory (pinned, for a CUDA device) and visit the compute device only while
their block runs.

- Just before a block's forward its frozen weights are copied to the device, on a side stream
  (CUDA), while the block before it computes (the next block is prefetched); after the block
  they are dropped. Frozen weights are never copied back: they do not change.
- An offloaded block runs under non-reentrant activation checkpointing (the model's own, when
  gradient checkpointing is on, else ours), so autograd keeps no weight of it: its forward runs
  again in backward, which copies its weights again, and they go when its backward has run.
- A LoRA's parameters (anything that requires grad) are never touched: they stay resident.
- bitsandbytes' nf4 and int8 layers carry quantization state beside the weight (a 4-bit
  parameter's quant_state, an int8 one's CB/SCB, a Linear8bitLt's `state`): each is copied with
  its tensors moved, never with bitsandbytes' own .to(), which moves a shared quant_state in place.
  Their autograd keeps the weight on ctx, out of checkpointing's reach, so in an offloaded block
  they run through FrozenQuantizedLinear (bitsandbytes' forward, a backward from saved tensors).

Hand-written, not diffusers' group offloading: that one restores every parameter of a group
(the LoRA's too) to a snapshot taken when it was applied (streams) or copies it back to the host,
and frees nothing that autograd holds for backward.
"""
import contextlib
import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import UserError

ATTRIBUTE = "loralab_offload"   # where the trainable model keeps its BlockOffload (for restore())


class OffloadTooMany(UserError, ValueError):
    """train.offload_blocks names more blocks than the model has."""


@dataclass
class Slot:
    """One frozen value of a block: `owner.name` holds `host` at rest on the host, `placeholder`
    (empty, on the device) between uses, and a device copy while its block runs."""
    owner: object
    name: str
    host: object
    placeholder: object


def offload_blocks(model, blocks, count, device, checkpointed, watch=None):
    """Offloads the last `count` of `blocks` (the family's list, in forward order) of `model`;
    `checkpointed`: the model checkpoints each of these blocks itself (gradient checkpointing
    on). `watch(tensor)` sees every device copy made (tests count what is resident). None when
    count is 0."""
    if count > len(blocks):  # the estimate's check names the model's count before loading, where it can
        raise OffloadTooMany(f"train.offload_blocks {count}: this model has {len(blocks)} blocks that can be "
                             f"offloaded; set it to at most {len(blocks)}, or to auto.")
    if count == 0:
        return None
    offload = BlockOffload(list(blocks)[len(blocks) - count:], torch.device(device), checkpointed, watch)
    setattr(model, ATTRIBUTE, offload)
    # the first offloaded block is copied while the model's first layers compute
    offload.hooks.append(model.register_forward_pre_hook(lambda module, args: offload.prefetch(0)))
    return offload


def restore(model):
    """Puts every offloaded weight back in its module (on the host) and removes the hooks: the
    model as it was before offload_blocks, wherever its other weights are."""
    offload = vars(model).pop(ATTRIBUTE, None)
    if offload is not None:
        offload.remove()


class BlockOffload:
    def __init__(self, blocks, device, checkpointed, watch=None):
        self.blocks, self.device, self.checkpointed, self.watch = blocks, device, checkpointed, watch
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.quantized = [m for block in blocks for m in block.modules() if quantized_weight(m)]
        self.slots = [take_slots(block, device) for block in blocks]
        self.copies = {}      # block index -> (device values, their tensors, the copy's CUDA event)
        self.in_use, self.hooks = set(), []
        for index, block in enumerate(blocks):
            block.forward = functools.partial(self.forward, index, block.forward)
        for module in self.quantized:
            module.forward = functools.partial(frozen_quantized_forward, module, module.forward)

    def forward(self, index, original, *args, **kwargs):
        if torch.is_grad_enabled() and not self.checkpointed:
            return checkpoint(self.run, index, original, *args, use_reentrant=False, **kwargs)
        return self.run(index, original, *args, **kwargs)

    def run(self, index, original, *args, **kwargs):
        self.fetch(index)
        # In backward (checkpoint's recompute) the blocks come in reverse order: prefetch the one before.
        backward = torch._C._current_graph_task_id() != -1  # as torch.utils.checkpoint asks it
        self.prefetch(index - 1 if backward else index + 1)
        try:
            return original(*args, **kwargs)
        finally:
            self.drop(index)
            if index == len(self.blocks) - 1 and torch.is_grad_enabled() and not backward:
                self.prefetch(index)  # a backward begins with this block's recompute

    def copy(self, index):
        """Starts copying block `index`'s frozen weights to the device (side stream on CUDA)."""
        made = {}   # one device copy per host storage (an int8 weight and its CB share one)

        def move(tensor):
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if key not in made:
                made[key] = tensor.to(self.device, non_blocking=True, copy=True)
            return made[key]

        side = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with side:
            values = [moved(slot.host, move) for slot in self.slots[index]]
            event = self.stream.record_event() if self.stream is not None else None
        for value in values if self.watch else ():
            self.watch(value)   # what the modules (and then autograd) hold
        self.copies[index] = (values, list(made.values()), event)

    def prefetch(self, index):
        if not 0 <= index < len(self.blocks) or index in self.copies:
            return
        for stale in [i for i in self.copies if i not in self.in_use]:  # at most one waits
            self.release(stale)
        self.copy(index)

    def fetch(self, index):
        if index not in self.copies:
            self.copy(index)
        values, _, event = self.copies[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.in_use.add(index)
        for slot, value in zip(self.slots[index], values):
            setattr(slot.owner, slot.name, value)

    def drop(self, index):
        """The block's modules get their placeholders back; the device copies go as soon as
        nothing else holds them (autograd holds them until this block's backward has run)."""
        for slot in self.slots[index]:
            setattr(slot.owner, slot.name, slot.placeholder)
        self.in_use.discard(index)
        self.release(index)

    def release(self, index):
        _, tensors, _ = self.copies.pop(index)
        if self.stream is not None:  # made on the side stream, used on the compute stream
            current = torch.cuda.current_stream(self.device)
            for tensor in tensors:
                tensor.record_stream(current)

    @contextlib.contextmanager
    def weights_on_host(self):
        """The frozen weights in their modules, on the host, while peft adds its layers (DoRA
        reads the base weight); after it, the blocks' new parameters (the LoRA's) go to the device."""
        for slots in self.slots:
            for slot in slots:
                setattr(slot.owner, slot.name, slot.host)
        try:
            yield
        finally:
            for slots in self.slots:
                for slot in slots:
                    setattr(slot.owner, slot.name, slot.placeholder)
            for block in self.blocks:
                block.to(self.device)

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        for index in list(self.copies):
            self.release(index)
        for block, slots in zip(self.blocks, self.slots):
            for slot in slots:
                setattr(slot.owner, slot.name, slot.host)
            vars(block).pop("forward", None)
        for module in self.quantized:
            vars(module).pop("forward", None)


def take_slots(block, device):
    """The block's frozen values (parameters that require no grad, buffers, a Linear8bitLt's
    int8 state), each moved to the host store; its modules hold empty placeholders instead."""
    slots, hosts = [], {}   # hosts: one host copy per value shared by several modules
    to_host = functools.partial(host_copy, pinned=device.type == "cuda")
    for module in block.modules():
        values = [(name, p) for name, p in module._parameters.items() if p is not None and not p.requires_grad]
        values += [(name, b) for name, b in module._buffers.items() if b is not None]
        state = getattr(module, "state", None)
        if hasattr(state, "CB"):   # bitsandbytes' Linear8bitLt: its forward keeps CB in its state
            values.append(("state", state))
        for name, value in values:
            if id(value) not in hosts:
                hosts[id(value)] = moved(value, to_host)
            placeholder = (moved(value, lambda t: t[:0].to(device)) if name == "state"  # CB, SCB empty
                           else empty_like(value, device))
            slots.append(Slot(module, name, hosts[id(value)], placeholder))
            setattr(module, name, placeholder)
    return slots


def host_copy(tensor, pinned):
    """The tensor in host memory: pinned for a CUDA device (straight in, no unpinned copy on the
    way); a CPU tensor as it is otherwise."""
    tensor = tensor.detach()
    if not pinned or tensor.is_pinned():
        return tensor.to("cpu")
    return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)


def empty_like(value, device):
    """What a module holds between uses: an empty tensor (or frozen parameter) of the value's
    dtype on the device, so the model's .to(), dtype and device read as before."""
    empty = torch.empty(0, dtype=value.dtype, device=device)
    return nn.Parameter(empty, requires_grad=False) if isinstance(value, nn.Parameter) else empty


def moved(value, move):
    """A copy of a frozen value with each of its tensors moved by `move`: a tensor, a parameter,
    bitsandbytes' Params4bit (with its quant_state), Int8Params (CB, SCB) or MatmulLtState."""
    if type(value) is torch.Tensor:
        return move(value)
    if type(value) is nn.Parameter:
        return nn.Parameter(move(value.data), requires_grad=False)
    if hasattr(value, "quant_state"):   # Params4bit: its own __copy__ keeps the bnb attributes
        new = copy.copy(value)
        new.data = move(value.data)
        new.quant_state = None if value.quant_state is None else moved_quant_state(value.quant_state, move)
        return new
    both = {name: None if getattr(value, name) is None else move(getattr(value, name)) for name in ("CB", "SCB")}
    if isinstance(value, nn.Parameter):  # Int8Params
        return type(value)(move(value.data), requires_grad=False, has_fp16_weights=value.has_fp16_weights, **both)
    new = copy.copy(value)   # MatmulLtState, a dataclass
    for name, tensor in both.items():
        setattr(new, name, tensor)
    return new


def moved_quant_state(state, move):
    new = copy.copy(state)
    new.absmax, new.code = move(state.absmax), move(state.code)
    if state.nested:
        new.offset = move(state.offset)
        new.state2 = copy.copy(state.state2)
        new.state2.absmax, new.state2.code = move(state.state2.absmax), move(state.state2.code)
    return new


def quantized_weight(module):
    """"nf4" or "int8" for bitsandbytes' Linear4bit / Linear8bitLt (by what they carry), else None."""
    weight = getattr(module, "weight", None)
    if hasattr(weight, "quant_state"):
        return "nf4"
    return "int8" if hasattr(getattr(module, "state", None), "CB") else None


def frozen_quantized_forward(module, forward, x):
    """A frozen bitsandbytes layer whose backward needs only saved tensors. bitsandbytes' own
    autograd keeps the weight (4-bit) or its int8 state on ctx, where checkpointing cannot drop
    it, so an offloaded block's weights would stay on the device from its forward to its backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return forward(x)
    if quantized_weight(module) == "nf4":
        state = module.weight.quant_state
        tensors = [module.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        shape = copy.copy(state)  # its metadata only: the tensors travel as saved tensors
        shape.absmax = shape.code = shape.offset = shape.state2 = None
        nested = copy.copy(state.state2) if state.nested else None
        if nested is not None:
            nested.absmax = nested.code = None
        dequantize = functools.partial(dequantize_4bit, shape, nested)
        dtype = module.compute_dtype or x.dtype
    else:   # before its first forward Linear8bitLt keeps CB and SCB on the weight
        holder = module.state if module.state.CB is not None else module.weight
        tensors, dequantize, dtype = [holder.CB, holder.SCB], dequantize_int8, x.dtype
    return FrozenQuantizedLinear.apply(x, forward, dequantize, dtype, *tensors)


class FrozenQuantizedLinear(torch.autograd.Function):
    """y = forward(x) (bitsandbytes' own kernels); dx = dy W, W dequantized from saved tensors
    in `dtype`, as bitsandbytes' backward computes it."""

    @staticmethod
    def forward(ctx, x, forward, dequantize, dtype, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.dequantize, ctx.dtype, ctx.input_dtype, ctx.input_shape = dequantize, dtype, x.dtype, x.shape
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors   # read once: checkpointing unpacks each saved tensor once
        weight = ctx.dequantize(*saved, dtype=ctx.dtype)   # [out, in]
        if saved[0].dtype == torch.int8:   # bitsandbytes' int8 backward flattens; its 4-bit one does not
            grad = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.matmul(grad.to(ctx.dtype), weight)
        return grad_x.view(ctx.input_shape).to(ctx.input_dtype), None, None, None, *[None] * len(saved)


def dequantize_4bit(shape, nested, data, absmax, code, *rest, dtype):
    from bitsandbytes.functional import dequantize_4bit as dequantize

    state = copy.copy(shape)
    state.absmax, state.code = absmax, code
    if rest:
        state.offset, state.state2 = rest[0], copy.copy(nested)
        state.state2.absmax, state.state2.code = rest[1], rest[2]
    return dequantize(data.view(-1, 1), state).to(dtype)   # the packed layout bitsandbytes' backward reads


def dequantize_int8(cb, scb, dtype):
    return cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
