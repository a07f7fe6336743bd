"""Single .safetensors files as ComfyUI users keep them: read the header without loading any
tensor, stream tensors one at a time with plain file reads (not mmap: the pages read stay in the
OS's file cache and never count towards the process's resident memory), undo fp8 and ComfyUI's
"scaled fp8", write a file tensor by tensor, and tell what the shared parts are (a CLIP, a T5, an
autoencoder, a LoRA) from their key names and shapes; each family describes its own files."""
import json
import math
import os
import re
import struct

import torch
from safetensors import SafetensorError, safe_open

# safetensors dtype names -> torch dtypes: tensors are read with plain file reads (below), so
# their bytes are viewed as these
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_NAMES = ("F8_E4M3", "F8_E5M2")
# the key that marks ComfyUI's "scaled fp8" files (fp8 weights, a `<layer>.scale_weight` each)
SCALED_FP8_MARKER = "scaled_fp8"
# our writer stores the rope axes of a transformer whose head_dim is not FLUX's 128
AXES_METADATA_KEY = "loralab.axes_dims_rope"


def _header(path):
    """(tensors, metadata, offset of the data section), the header read by safetensors itself.
    The format stores the tensors back to back in offset order with no gap (safe_open refuses a
    file that does not), so each tensor's offsets follow from that order and its size."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors, offset = {}, 0
            for name in f.offset_keys():
                part = f.get_slice(name)
                dtype, shape = part.get_dtype(), part.get_shape()
                # past a dtype we cannot size, offsets are unknown: those tensors cannot be read
                size = math.prod(shape) * DTYPES[dtype].itemsize if dtype in DTYPES else None
                known = offset is not None and size is not None
                tensors[name] = {"dtype": dtype, "shape": shape,
                                 "data_offsets": [offset, offset + size] if known else None}
                offset = offset + size if known else None
    except SafetensorError as error:
        raise ValueError(f"{path} is not a .safetensors file ({error})") from None
    # the data section ends the file; with an unknown size, plain reads are refused (raw)
    return tensors, metadata, os.path.getsize(path) - offset if offset is not None else None


def read_header(path):
    """({name: {"dtype", "shape", "data_offsets"}}, metadata) of a .safetensors file; reads only
    the header, whatever the file's size."""
    tensors, metadata, _ = _header(path)
    return tensors, metadata


class SafetensorsFile:
    """One file, its tensors read on demand with plain reads (one tensor in memory at a time)."""

    def __init__(self, path):
        self.path = path
        self.tensors, self.metadata, self._data_start = _header(path)
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._file = None

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name):
        return name in self.tensors

    def raw(self, name):
        """The tensor as stored (fp8 stays fp8)."""
        info = self.tensors[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None or self._data_start is None:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        handle = self._file or open(self.path, "rb")
        try:
            handle.seek(self._data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.path} is truncated (tensor {name})")
        finally:
            if handle is not self._file:
                handle.close()
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def read_rows(self, name, start, stop, buffer):
        """Rows start:stop of a tensor's first dimension, read into `buffer` (a bytearray that
        is reused, so a tensor can be processed a block at a time); returns the bytes read."""
        info = self.tensors[name]
        row_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // max(1, info["shape"][0])
        view = memoryview(buffer)[:(stop - start) * row_bytes]
        self._file.seek(self._data_start + info["data_offsets"][0] + start * row_bytes)
        if self._file.readinto(view) != len(view):
            raise ValueError(f"{self.path} is truncated (tensor {name})")
        return view

    def scale_of(self, name):
        """The name of the scale tensor of an fp8 weight, if the file has one."""
        if not name.endswith(".weight"):
            return None
        layer = name[:-len(".weight")]
        for candidate in (layer + ".scale_weight", layer + ".weight_scale"):
            if candidate in self.tensors:
                return candidate
        return None

    def get(self, name, dtype=None):
        """The tensor, fp8 dequantised (times its scale, if any) to `dtype` (float32 if None);
        other tensors cast to `dtype` when given."""
        tensor = self.raw(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = self.scale_of(name)
            return dequantize(tensor, self.raw(scale) if scale else None, dtype or torch.float32)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def is_scale_key(name):
    return name.endswith((".scale_weight", ".scale_input", ".weight_scale", ".input_scale")) \
        or name == SCALED_FP8_MARKER or name.endswith("." + SCALED_FP8_MARKER)


def dequantize(weight, scale, dtype):
    """fp8 weight (times scale: a scalar or one per output row) in `dtype`."""
    out = weight.to(torch.float32)
    if scale is not None:
        scale = scale.to(torch.float32)
        if scale.numel() > 1 and scale.dim() == 1:
            scale = scale.reshape(-1, *([1] * (out.dim() - 1)))
        out = out * scale
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# What a file is: the parts several families share (each family describes its own files,
# ModelFamily.describe_file; core/families/__init__.py describe_file asks them first)


def clip_prefix(names):
    """'text_model.' (HF and ComfyUI files) or '' (a CLIPTextModel saved without it); None when
    the keys are not a CLIP text encoder's."""
    for prefix in ("text_model.", ""):
        if prefix + "embeddings.token_embedding.weight" in names and \
                prefix + "encoder.layers.0.mlp.fc1.weight" in names:
            return prefix
    return None


def count_layers(names, pattern):
    """How many numbered layers `pattern` (one group: the number) finds in key names."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in map(regex.match, names) if m}
    return max(found) + 1 if found else 0


def is_clip(tensors):
    return clip_prefix(tensors) is not None


def is_t5(tensors):
    return any(k.startswith("encoder.block.") for k in tensors) and \
        any(k.endswith("SelfAttention.q.weight") for k in tensors)


def is_ldm_autoencoder(tensors):
    """An autoencoder in BFL's / the original LDM's key layout (FLUX.1's ae.safetensors)."""
    return "encoder.conv_in.weight" in tensors and "decoder.conv_in.weight" in tensors and \
        "encoder.down.0.block.0.conv1.weight" in tensors


def describe_shared(tensors):
    """Words for the files no one family owns: text encoders, autoencoders, LoRAs."""
    if is_clip(tensors):
        width = tensors[clip_prefix(tensors) + "embeddings.token_embedding.weight"]["shape"][1]
        name = {768: "CLIP-L", 1024: "CLIP-H", 1280: "CLIP-G"}.get(width, f"CLIP ({width} wide)")
        return f"a {name} text encoder"
    if is_t5(tensors):
        layers = count_layers(tensors, r"encoder\.block\.(\d+)\.")
        return f"a T5 text encoder ({layers} layers)"
    from .qwen3 import describe as describe_qwen3

    qwen3 = describe_qwen3(tensors)
    if qwen3:
        return qwen3
    if is_ldm_autoencoder(tensors):
        latent = tensors["decoder.conv_in.weight"]["shape"][1]
        return f"an autoencoder (VAE) with {latent} latent channels"
    if any(".lora_down." in k or ".lora_A." in k or "lora_unet_" in k for k in tensors):
        return "a LoRA"
    if "decoder.conv_in.weight" in tensors:
        return "a VAE of another layout (diffusers or SD)"
    return f"an unknown model ({len(tensors)} tensors, e.g. {sorted(tensors)[:2]})"


# ---------------------------------------------------------------------------------------------
# Rope axes


def checked_file(path, setting, wanted, is_wanted, looks=None):
    """The file's absolute path, after checking it exists and that `is_wanted(tensors)` holds for
    its header; else a ModelError naming the setting, what the file looks like (`looks(path)`,
    by default what the families say of it) and what to give."""
    from ..base import ModelError

    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ModelError(f"{setting}: file not found: {path}. Give {wanted}.")
    try:
        found = is_wanted(read_header(path)[0])
    except (OSError, ValueError):
        found = False
    if not found:
        if looks is None:
            from .. import describe_file as looks
        raise ModelError(f"{setting}: {path} looks like {looks(path)}, not {wanted}. Give {wanted} in {setting}.")
    return path


def default_axes(head_dim):
    """Rope axes (time, height, width) for a head_dim: FLUX's (16, 56, 56) at 128; otherwise an
    even split keeping FLUX's proportions: the first axis an eighth of head_dim (rounded to an
    even number), the rest shared equally by height and width (each even)."""
    if head_dim == 128:
        return (16, 56, 56)
    first = max(2, (head_dim // 8) // 2 * 2)
    side = (head_dim - first) // 2 // 2 * 2
    first = head_dim - 2 * side
    return (first, side, side)


def folder_transformer_files(folder):
    """The safetensors shard(s) of a diffusers folder's transformer, or None if it has none."""
    sub = os.path.join(folder, "transformer")
    index = os.path.join(sub, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(sub, s) for s in shards]
    single = os.path.join(sub, "diffusion_pytorch_model.safetensors")
    return [single] if os.path.isfile(single) else None


def file_size(path):
    return os.path.getsize(path)


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_streaming(path, specs, metadata=None):
    """Writes a .safetensors file tensor by tensor: specs is [(name, shape, dtype, make)] where
    make() returns the tensor; only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in specs:
        size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in specs:
            tensor = make().to(dtype).contiguous().reshape(shape)
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return path
