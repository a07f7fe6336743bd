"""What FLUX.1's files look like: the prefix before a transformer's keys, which FLUX.1 part a file
is, and the transformer's config read from its header (the shared reading is parts/files.py)."""
import json
import re

from ..parts.autoencoder import is_flux_ae
from ..parts.files import AXES_METADATA_KEY, clip_prefix, count_layers, default_axes, is_t5, read_header
from .keys import stored_key

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# FLUX.2's transformer shares FLUX.1's key layout; this key of its tells them apart
_LATER_TRANSFORMER = "double_stream_modulation_img.lin.weight"


def strip_prefix(names):
    """The prefix ComfyUI or other exporters put before a transformer's BFL or diffusers keys
    ('' if none); ComfyUI's loader strips `model.diffusion_model.` or `model.` from either
    (comfy/model_detection.py, unet_prefix_from_state_dict)."""
    for prefix in _PREFIXES:
        if any(k.startswith((prefix + "double_blocks.", prefix + "transformer_blocks.")) for k in names):
            return prefix
    return ""


def identify(path):
    """One of FLUX.1's parts, "flux_transformer", "clip_l", "t5", "flux_vae", or "unknown"."""
    return _identify(read_header(path)[0])


def _identify(tensors):
    names = set(tensors)
    prefix = strip_prefix(names)
    if prefix + _LATER_TRANSFORMER in names:
        return "unknown"
    if prefix + "double_blocks.0.img_attn.qkv.weight" in names or \
            prefix + "x_embedder.weight" in names and prefix + "transformer_blocks.0.attn.add_q_proj.weight" in names:
        return "flux_transformer"
    if clip_prefix(names) is not None:
        return "clip_l"
    if is_t5(names):
        return "t5"
    if is_flux_ae(names):
        return "flux_vae"
    return "unknown"


def describe_file(tensors):
    """Words for a FLUX.1 transformer (ModelFamily.describe_file); None for any other file."""
    if _identify(tensors) != "flux_transformer":
        return None
    prefix = strip_prefix(tensors)
    variant = "dev" if any(k.startswith(prefix + "guidance_in.") or
                           k.startswith(prefix + "time_text_embed.guidance_embedder.") for k in tensors) \
        else "schnell"
    return f"a FLUX.1 transformer ({variant})"


def transformer_config(tensors, metadata):
    """The diffusers FluxTransformer2DModel config of a transformer file (BFL or diffusers keys),
    from its header: block counts, heads, widths, dev (guidance) or schnell."""
    names = set(tensors)
    prefix = strip_prefix(names)
    shape = lambda name: tensors[name]["shape"]  # noqa: E731
    if prefix + "img_in.weight" in names or "double_blocks.0.img_attn.qkv.weight" in names:
        p = prefix
        num_layers = count_layers(names, re.escape(p) + r"double_blocks\.(\d+)\.")
        num_single = count_layers(names, re.escape(p) + r"single_blocks\.(\d+)\.")
        hidden, in_channels = shape(p + "img_in.weight")
        head_dim = shape(stored_key(p + "double_blocks.0.img_attn.norm.query_norm.scale", names))[0]
        joint = shape(p + "txt_in.weight")[1]
        pooled = shape(p + "vector_in.in_layer.weight")[1]
        guidance = p + "guidance_in.in_layer.weight" in names
        out_channels = shape(p + "final_layer.linear.weight")[0]
    else:
        names = {k[len(prefix):] for k in names if k.startswith(prefix)}
        shape = lambda name: tensors[prefix + name]["shape"]  # noqa: E731
        num_layers = count_layers(names, r"transformer_blocks\.(\d+)\.")
        num_single = count_layers(names, r"single_transformer_blocks\.(\d+)\.")
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


