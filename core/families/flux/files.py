"""Single .safetensors files as ComfyUI users keep them: read the header without loading any
tensor, stream tensors one at a time with plain file reads (not mmap: the pages read stay in the
OS's file cache and never count towards the process's resident memory), undo fp8 and ComfyUI's
"scaled fp8", and tell what a file is (a FLUX transformer, a CLIP-L, a T5, a FLUX VAE, an SD
checkpoint...) from its key names and shapes."""
import json
import math
import os
import re
import struct

import torch
from safetensors import SafetensorError, safe_open

from .keys import stored_key

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
# What a file is


_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def strip_prefix(names):
    """The prefix ComfyUI or other exporters put before a transformer's BFL or diffusers keys
    ('' if none); ComfyUI's loader strips `model.diffusion_model.` or `model.` from either
    (comfy/model_detection.py, unet_prefix_from_state_dict)."""
    for prefix in _PREFIXES:
        if any(k.startswith((prefix + "double_blocks.", prefix + "transformer_blocks.")) for k in names):
            return prefix
    return ""


def clip_prefix(names):
    """'text_model.' (HF and ComfyUI files) or '' (a CLIPTextModel saved without it); None when
    the keys are not a CLIP text encoder's."""
    for prefix in ("text_model.", ""):
        if prefix + "embeddings.token_embedding.weight" in names and \
                prefix + "encoder.layers.0.mlp.fc1.weight" in names:
            return prefix
    return None


def _count(names, pattern):
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in map(regex.match, names) if m}
    return max(found) + 1 if found else 0


def identify(path):
    """One of "flux_transformer", "clip_l", "t5", "flux_vae", "sdxl_checkpoint",
    "sd15_checkpoint", "unknown"."""
    return _identify(read_header(path)[0])


def _identify(tensors):
    names = set(tensors)
    prefix = strip_prefix(names)
    if prefix + "double_blocks.0.img_attn.qkv.weight" in names or \
            prefix + "x_embedder.weight" in names and prefix + "transformer_blocks.0.attn.add_q_proj.weight" in names:
        return "flux_transformer"
    if any(k.startswith("conditioner.embedders.1.") for k in names) or \
            "model.diffusion_model.label_emb.0.0.weight" in names:
        return "sdxl_checkpoint"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in names):
        return "sd15_checkpoint"
    if clip_prefix(names) is not None:
        return "clip_l"
    if any(k.startswith("encoder.block.") for k in names) and \
            any(k.endswith("SelfAttention.q.weight") for k in names):
        return "t5"
    if "encoder.conv_in.weight" in names and "decoder.conv_in.weight" in names:
        return "flux_vae" if "encoder.down.0.block.0.conv1.weight" in names else "unknown"
    return "unknown"


def describe(path):
    """A short human text of what the file looks like."""
    try:
        tensors, _ = read_header(path)
    except (OSError, ValueError) as error:
        return f"not a readable .safetensors file ({error})"
    kind = _identify(tensors)
    if kind == "flux_transformer":
        prefix = strip_prefix(tensors)
        variant = "dev" if any(k.startswith(prefix + "guidance_in.") or
                               k.startswith(prefix + "time_text_embed.guidance_embedder.") for k in tensors) \
            else "schnell"
        return f"a FLUX.1 transformer ({variant})"
    if kind == "clip_l":
        width = tensors[clip_prefix(tensors) + "embeddings.token_embedding.weight"]["shape"][1]
        name = {768: "CLIP-L", 1024: "CLIP-H", 1280: "CLIP-G"}.get(width, f"CLIP ({width} wide)")
        return f"a {name} text encoder"
    if kind == "t5":
        layers = _count(tensors, r"encoder\.block\.(\d+)\.")
        return f"a T5 text encoder ({layers} layers)"
    if kind == "flux_vae":
        latent = tensors["decoder.conv_in.weight"]["shape"][1]
        return f"an autoencoder (VAE) with {latent} latent channels"
    if kind == "sdxl_checkpoint":
        return "an SDXL checkpoint (UNet, VAE and text encoders in one file)"
    if kind == "sd15_checkpoint":
        return "a Stable Diffusion 1.x/2.x checkpoint (UNet, VAE and text encoder in one file)"
    if any(".lora_down." in k or ".lora_A." in k or "lora_unet_" in k for k in tensors):
        return "a LoRA"
    if "decoder.conv_in.weight" in tensors:
        return "a VAE of another layout (diffusers or SD)"
    return f"an unknown model ({len(tensors)} tensors, e.g. {sorted(tensors)[:2]})"


# ---------------------------------------------------------------------------------------------
# The transformer's config, read from the file


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


def transformer_config(tensors, metadata):
    """The diffusers FluxTransformer2DModel config of a transformer file (BFL or diffusers keys),
    from its header: block counts, heads, widths, dev (guidance) or schnell."""
    names = set(tensors)
    prefix = strip_prefix(names)
    shape = lambda name: tensors[name]["shape"]  # noqa: E731
    if prefix + "img_in.weight" in names or "double_blocks.0.img_attn.qkv.weight" in names:
        p = prefix
        num_layers = _count(names, re.escape(p) + r"double_blocks\.(\d+)\.")
        num_single = _count(names, re.escape(p) + r"single_blocks\.(\d+)\.")
        hidden, in_channels = shape(p + "img_in.weight")
        head_dim = shape(stored_key(p + "double_blocks.0.img_attn.norm.query_norm.scale", names))[0]
        joint = shape(p + "txt_in.weight")[1]
        pooled = shape(p + "vector_in.in_layer.weight")[1]
        guidance = p + "guidance_in.in_layer.weight" in names
        out_channels = shape(p + "final_layer.linear.weight")[0]
    else:
        names = {k[len(prefix):] for k in names if k.startswith(prefix)}
        shape = lambda name: tensors[prefix + name]["shape"]  # noqa: E731
        num_layers = _count(names, r"transformer_blocks\.(\d+)\.")
        num_single = _count(names, r"single_transformer_blocks\.(\d+)\.")
        hidden, in_channels = shape("x_embedder.weight")
        head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
        joint = shape("context_embedder.weight")[1]
        pooled = shape("time_text_embed.text_embedder.linear_1.weight")[1]
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in names
        out_channels = shape("proj_out.weight")[0]
    axes = None
    if metadata and metadata.get(AXES_METADATA_KEY):
        try:
            axes = tuple(int(a) for a in json.loads(metadata[AXES_METADATA_KEY]))
        except (ValueError, TypeError, RecursionError):  # damaged metadata: ignored, as a wrong sum is
            axes = None
        if axes and sum(axes) != head_dim:
            axes = None
    config = {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "num_layers": num_layers,
        "num_single_layers": num_single,
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden) // int(head_dim),
        "joint_attention_dim": int(joint),
        "pooled_projection_dim": int(pooled),
        "guidance_embeds": guidance,
        "axes_dims_rope": axes or default_axes(int(head_dim)),
    }
    if out_channels != in_channels:
        config["out_channels"] = int(out_channels)
    return config


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
