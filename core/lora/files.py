"""The LoRA file (docs/architecture.md, "LoRA file"): safetensors in the save dtype, alpha baked
into lora_B, diffusers keys with the `transformer.` prefix or kohya keys, config in metadata."""
import json

from safetensors import safe_open
from safetensors.torch import save_file

from ..dtypes import torch_dtype
from ..runs.atomic import atomic_path


def bake_alpha(weights, rank, alpha):
    """lora_B * (alpha / rank): every loader then applies the LoRA at scale 1, alpha key or not."""
    scale = alpha / rank
    return {k: (v * scale if ".lora_B." in k else v) for k, v in weights.items()}


def file_tensors(weights, rank, alpha, fmt, dtype, to_kohya=None, prefix="transformer."):
    """The tensors of a LoRA file from peft weights (float32, peft names)."""
    baked = bake_alpha(weights, rank, alpha)
    if fmt == "kohya":
        if to_kohya is None:
            raise ValueError("this model family has no kohya key mapping")
        tensors = to_kohya(baked)
    else:
        tensors = {prefix + k: v for k, v in baked.items()}
    save_dtype = torch_dtype(dtype)
    return {k: (v if k.endswith(".alpha") else v.to(save_dtype)).contiguous() for k, v in tensors.items()}


def file_metadata(config, step, rank, alpha, fmt):
    """String metadata: ours plus the ss_* keys that kohya-aware tools (and ComfyUI's UI) show.
    The weights have alpha / rank baked in, so the file's own scale is 1: ss_network_alpha equals
    ss_network_dim, as the kohya `.alpha` tensors equal their (fused) rank; the alpha the LoRA was
    trained with is kept in loralab_network_alpha."""
    return {
        "format": "pt",
        "loralab_version": "1",
        "loralab_format": fmt,
        "loralab_step": str(step),
        "loralab_network_dim": str(rank),
        "loralab_network_alpha": str(alpha),
        "loralab_config": json.dumps(config, sort_keys=True, default=str),
        "ss_network_module": "networks.lora_flux" if fmt == "kohya" else "peft",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_output_name": str(config.get("name", "")),
        "ss_steps": str(step),
        "ss_base_model_version": "flux1",
    }


def save_lora_file(path, tensors, metadata):
    """Writes atomically: a reader never sees a half-written LoRA."""
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return path


def read_lora_file(path):
    tensors = {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata
