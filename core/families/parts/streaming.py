"""A model built empty on the meta device and filled tensor by tensor from a single file, as every
family reads ComfyUI's files: no random full-precision model is ever made and at most one tensor
is read ahead of the model. A fused file tensor is split by rows; fp8 stays fp8 where the layer
keeps it (Float8Linear), or a full-precision weight is made fp8 as it is read."""
import math
import os

import torch
from torch import nn

from ..base import ModelError
from . import fp8 as fp8_ops
from .files import DTYPES, FP8_NAMES, dequantize, is_scale_key


def swap_halves(tensor):
    # diffusers' AdaLayerNormContinuous orders (scale, shift); BFL's final layer (shift, scale).
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _assign(model, name, tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(name)


def model_shapes(model):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if b is not None})
    return shapes


def check_complete(model, setting, path):
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p is not None and p.device.type == "meta"]
    if missing:
        raise ModelError(f"{setting}: {path} lacks {len(missing)} weights of the model it describes "
                         f"(e.g. {missing[:3]}); is the file complete?")


def fill(model, source, plan, dtype, setting, fp8_names=()):
    """Assigns every planned tensor: plan is [(file key, [(model name, rows)], swap halves)];
    a fused file tensor is split by rows. Weights of `fp8_names` (Float8Linear layers) stay fp8."""
    shapes = model_shapes(model)
    for file_key, targets, swap in plan:
        if file_key not in source:
            continue
        fp8_targets = [n for n, _ in targets if n[:-len(".weight")] in fp8_names and n.endswith(".weight")]
        if fp8_targets and len(fp8_targets) == len(targets) and not swap and \
                source.tensors[file_key]["dtype"] not in FP8_NAMES:
            # quantize "fp8" of a full-precision file: each weight made fp8 as it is read
            for (name, _), (weight, scale) in zip(targets, _fp8_pieces(source, file_key, [r for _, r in targets])):
                if tuple(weight.shape) != shapes[name]:
                    raise ModelError(f"{setting}: {source.path}: {file_key} has shape {tuple(weight.shape)} "
                                     f"where the model needs {shapes[name]} for {name}")
                model.get_submodule(name[:-len(".weight")]).set_weight(weight, scale)
            continue
        raw = source.raw(file_key)
        if fp8_targets and raw.dtype in (torch.float8_e4m3fn,):
            scale_key = source.scale_of(file_key)
            scale = source.raw(scale_key).float() if scale_key else torch.ones(1)
            pieces = _split(raw, [r for _, r in targets])
            scales = _split(scale, [r for _, r in targets]) if scale.numel() > 1 else [scale] * len(pieces)
            for (name, _), piece, piece_scale in zip(targets, pieces, scales):
                model.get_submodule(name[:-len(".weight")]).set_weight(piece, piece_scale)
            continue
        tensor = _converted(source, file_key, raw, dtype)  # from the bytes read: never a second read
        del raw
        if swap:
            tensor = swap_halves(tensor)
        for (name, _), piece in zip(targets, _split(tensor, [r for _, r in targets])):
            if name not in shapes:
                continue
            if tuple(piece.shape) != shapes[name]:
                raise ModelError(f"{setting}: {source.path}: {file_key} has shape {tuple(piece.shape)} "
                                 f"where the model needs {shapes[name]} for {name}")
            if name[:-len(".weight")] in fp8_names and name.endswith(".weight"):
                model.get_submodule(name[:-len(".weight")]).set_weight(piece)
            else:
                _assign(model, name, piece)


def _converted(source, file_key, raw, dtype):
    """SafetensorsFile.get's value (fp8 dequantised with its scale, floats in `dtype`) of a tensor
    already read as `raw`; a bf16 tensor loaded in bf16 keeps its buffer, so the largest tensor (a
    7B text encoder's 1 GB embedding) is never in memory twice."""
    if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = source.scale_of(file_key)
        return dequantize(raw, source.raw(scale) if scale else None, dtype or torch.float32)
    return raw.to(dtype) if raw.is_floating_point() and dtype is not None else raw


def _fp8_pieces(source, file_key, rows, block_bytes=16 << 20):
    """[(fp8 weight, float32 scale)] of each row range `rows` of a full-precision file tensor,
    equal to fp8.to_fp8 of each piece, read from the file a block of rows at a time into one
    reused buffer (twice: the scale needs the largest magnitude first). Neither the whole tensor
    nor a float32 copy of it is ever in memory (to_fp8 of a whole bf16 weight holds 6x its bytes
    at once), and no buffer is freed between the fp8 weights kept, which would fragment the heap."""
    info = source.tensors[file_key]
    dtype, shape = DTYPES[info["dtype"]], info["shape"]
    row_size = math.prod(shape[1:])
    row_bytes = row_size * torch.empty(0, dtype=dtype).element_size()
    block = max(1, block_bytes // (row_size * 4))
    buffer = bytearray(block * row_bytes)
    stored = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(block, *shape[1:])
    work = torch.empty((block, *shape[1:]), dtype=torch.float32)

    def read(start, stop):
        source.read_rows(file_key, start, stop, buffer)
        return stored[:stop - start]

    rows = [shape[0]] if len(rows) == 1 else rows
    pieces, first = [], 0
    for count in rows:
        amax = torch.zeros((), dtype=torch.float32)
        for start in range(first, first + count, block):
            low, high = torch.aminmax(read(start, min(start + block, first + count)))
            amax = torch.maximum(amax, torch.maximum(low.abs(), high.abs()).float())
        scale = (amax / fp8_ops.FP8_MAX).clamp(min=1e-12) if amax > 0 else torch.tensor(1.0)
        weight = torch.empty((count, *shape[1:]), dtype=fp8_ops.FP8)
        for start in range(first, first + count, block):
            part = read(start, min(start + block, first + count))
            scaled = work[:len(part)].copy_(part).div_(scale).clamp_(-fp8_ops.FP8_MAX, fp8_ops.FP8_MAX)
            weight[start - first:start - first + len(part)].copy_(scaled)
        pieces.append((weight, scale.reshape(1).float()))
        first += count
    return pieces


def _split(tensor, rows):
    if len(rows) == 1:
        return [tensor]
    return list(torch.split(tensor, rows, dim=0))


def identity_plan(source, model, rename=lambda k: k):
    shapes = model_shapes(model)
    plan = []
    for key in source.keys():
        if is_scale_key(key):
            continue
        name = rename(key)
        if name in shapes:
            plan.append((key, [(name, shapes[name][0] if shapes[name] else 1)], False))
    return plan


def empty_model(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def freeze(model):
    model.requires_grad_(False)
    model.eval()
    return model


def comfyui_candidates(comfyui=None, model_files=()):
    """Where ComfyUI's source may be: the argument (inside ComfyUI, the node layer passes its
    folder), env LORALAB_COMFYUI, the folder above the `models/` folder holding a model file."""
    candidates = [comfyui, os.environ.get("LORALAB_COMFYUI")]
    for path in model_files:
        if not path:
            continue
        parts = os.path.abspath(str(path)).split(os.sep)
        if "models" in parts:
            index = len(parts) - 1 - parts[::-1].index("models")
            candidates.append(os.sep.join(parts[:index]) or os.sep)
    return [c for c in dict.fromkeys(candidates) if c]
