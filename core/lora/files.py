"""The LoRA file (docs/architecture.md, "LoRA file"): safetensors in the save dtype, alpha baked
into lora_B, diffusers keys with the family's prefix (`transformer.`, `unet.`) or kohya keys,
config in metadata."""
import json
import re

import torch
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


# a peft adapter tensor: (module, parameter); dora_scale is inject.dora_scales' ComfyUI form
ADAPTER_KEY = re.compile(r"^(.*)\.(lora_[AB]\.weight|lora_magnitude_vector|lokr_\w+|hada_\w+|dora_scale)$")
LYCORIS_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# the factor of each type that takes peft's scale (alpha / rank), so the file applies at scale 1
SCALED_FACTOR = ("lora_B.weight", "lokr_w1", "lokr_w1_a", "hada_w1_a")
# what ComfyUI's weight adapters divide a file's `.alpha` by, first found (lokr: w2_b over w1_b)
COMFY_RANK_OF = ("lora_A.weight", "lokr_w2_b", "lokr_w1_b", "hada_w1_b")


def is_plain_lora(network):
    return network.get("type", "lora") == "lora" and not network.get("dora")


def only_lora_pairs(weights):
    """Whether `weights` are a plain LoRA's (lora_A, lora_B), not LoKr / LoHa / DoRA."""
    matches = (ADAPTER_KEY.match(key) for key in weights)
    return not any(m and m[2] not in LYCORIS_NAMES for m in matches)


def by_module(weights):
    """{module: {parameter: tensor}} of peft adapter weights."""
    modules = {}
    for key, value in weights.items():
        match = ADAPTER_KEY.match(key)
        if match is None:
            raise ValueError(f"not a LoRA/LoKr/LoHa/DoRA weight: {key}")
        modules.setdefault(match[1], {})[match[2]] = value
    return modules


def bake_scale(weights, network):
    """bake_alpha for every network.type: peft's scale, alpha / rank (LoKr in full-rank mode: 1,
    inject.adapter_config), multiplied into one factor of each module's product."""
    if network.get("type", "lora") == "lora":
        return bake_alpha(weights, network)
    scale = 1.0 if network.get("lokr_full_rank") else network["linear_alpha"] / network["linear"]
    return {k: v * scale if k.endswith(tuple("." + f for f in SCALED_FACTOR)) else v for k, v in weights.items()}


def module_tensors(weights, name_of, lycoris_names=True):
    """A LoKr / LoHa / DoRA file's tensors from scale-baked peft weights: each module named by
    `name_of`, its tensors by LyCORIS's names (lokr_w1, hada_w1_a, lora_down, dora_scale), which
    ComfyUI's weight adapters read, and `.alpha` = the rank ComfyUI divides by (scale 1). peft's
    DoRA magnitude gives way to its dora_scale."""
    tensors = {}
    for module, params in by_module(weights).items():
        name = name_of(module)
        params.pop("lora_magnitude_vector", None)
        for param, value in params.items():
            tensors[f"{name}.{LYCORIS_NAMES.get(param, param) if lycoris_names else param}"] = value
        rank = next((params[p].shape[0] for p in COMFY_RANK_OF if p in params), None)
        if rank is not None and lycoris_names:
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def file_tensors(weights, network, fmt, dtype, to_kohya=None, to_diffusers=None):
    """The tensors of a LoRA file from peft weights (float32, peft names) trained with the
    `network` config section: kohya names by `to_kohya`, diffusers names by `to_diffusers` (the
    family's lora_to_diffusers; both take LoKr / LoHa / DoRA weights by module_tensors)."""
    if is_plain_lora(network):  # the DoRA scale is of no use to a plain LoRA file
        weights = {k: v for k, v in weights.items() if not k.endswith(".dora_scale")}
    baked = bake_scale(weights, network)
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
    if not is_plain_lora(network):  # LyCORIS's metadata for its types; DoRA as kohya's LoRA
        metadata["loralab_network_type"] = network["type"] + ("+dora" if network.get("dora") else "")
        if network["type"] != "lora":
            metadata["ss_network_module"] = "lycoris.kohya"
            metadata["ss_network_args"] = json.dumps({"algo": network["type"], **(
                {"factor": str(network.get("lokr_factor", -1))} if network["type"] == "lokr" else {})})
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
