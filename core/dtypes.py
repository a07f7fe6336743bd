"""Dtype names of the config (model.dtype, train.dtype: "bf16", "fp16", "fp32"; save.dtype:
"float16", "bfloat16", "float32") as torch dtypes: torch's own names, one alias table."""
import torch

SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name):
    """A torch.dtype for a config dtype name (a torch.dtype is returned as it is)."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, SHORT_NAMES.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def bytes_per_value(name):
    return torch_dtype(name).itemsize
