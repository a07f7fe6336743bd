"""The LoRA file (docs/architecture.md, "LoRA file"): safetensors in the save dtype, alpha baked
into lora_B, diffusers keys with the family's prefix (`transformer.`, `unet.`) or kohya keys,
config in metadata."""
import json

from safetensors import safe_open
from safetensors.torch import save_file

from ..dtypes import torch_dtype
from ..io import atomic_path
from .inject import text_encoder_of


def bake_alpha(weights, network):
    """lora_B * (alpha / rank): every loader then applies the LoRA at scale 1, alpha key or not.
    Conv layers (LoCon, 4-D weights) have their own rank and alpha (network.conv, conv_alpha)."""
    linear = network["linear_alpha"] / network["linear"]
    conv = (network.get("conv_alpha") or network.get("conv") or 1) / (network.get("conv") or 1)
    return {k: (v * (conv if v.dim() == 4 else linear) if ".lora_B." in k else v)
            for k, v in weights.items()}


def file_tensors(weights, network, fmt, dtype, to_kohya=None, to_diffusers=None):
    """The tensors of a LoRA file from peft weights (float32, peft names) trained with the
    `network` config section: kohya names by `to_kohya`, diffusers names by `to_diffusers` (the
    family's lora_to_diffusers)."""
    baked = bake_alpha(weights, network)
    if fmt == "kohya":
        if to_kohya is None:
            raise ValueError("this model family has no kohya key mapping")
        tensors = to_kohya(baked)
    else:
        if to_diffusers is None:
            raise ValueError("this model family has no diffusers key mapping")
        tensors = to_diffusers(baked)
    save_dtype = torch_dtype(dtype)
    return {k: (v if k.endswith(".alpha") else v.to(save_dtype)).contiguous() for k, v in tensors.items()}


def prefixed(weights, prefix):
    """The diffusers file's keys as diffusers' save_lora_weights writes them: the trainable
    model's get `prefix`, a text encoder's keep theirs (`text_encoder.`)."""
    return {(k if text_encoder_of(k) else prefix + k): v for k, v in weights.items()}


def file_metadata(config, step, fmt, kohya_metadata):
    """String metadata: ours plus the ss_* keys that kohya-aware tools (and ComfyUI's UI) show.
    The weights have alpha / rank baked in, so the file's own scale is 1: ss_network_alpha equals
    ss_network_dim, as the kohya `.alpha` tensors equal their (fused) rank; the alpha the LoRA was
    trained with is kept in loralab_network_alpha. `kohya_metadata` is the family's
    ss_base_model_version and ss_network_module."""
    network = config["network"]
    rank, alpha, conv = network["linear"], network["linear_alpha"], network.get("conv") or 0
    metadata = {
        "format": "pt",
        "loralab_version": "1",
        "loralab_format": fmt,
        "loralab_step": str(step),
        "loralab_network_dim": str(rank),
        "loralab_network_alpha": str(alpha),
        "loralab_config": json.dumps(config, sort_keys=True, default=str),
        "ss_network_module": kohya_metadata["ss_network_module"] if fmt == "kohya" else "peft",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_output_name": str(config.get("name", "")),
        "ss_steps": str(step),
        "ss_base_model_version": kohya_metadata["ss_base_model_version"],
    }
    train = config.get("train") or {}
    if train.get("ema"):  # the weights are the EMA's, not the last step's
        metadata["loralab_ema_decay"] = str(train["ema_decay"])
    if conv:  # kohya's LoCon settings, also at scale 1; the trained conv alpha is ours again
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv), "conv_alpha": str(conv)})
        metadata["loralab_conv_alpha"] = str(network.get("conv_alpha") or conv)
    return metadata


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
