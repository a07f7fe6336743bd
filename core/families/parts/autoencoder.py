"""FLUX.1's autoencoder (ae.safetensors) in BFL's layout, the original LDM key names, which
Z-Image decodes with too and SD's VAE and FLUX.2's share: its config read from the file, the
model filled from it, and the diffusers <-> BFL key names. A part of several families' models,
so it is no one family's (docs/architecture.md)."""
import re

from ..base import ModelError
from .files import SafetensorsFile, checked_file, count_layers, is_ldm_autoencoder, is_scale_key
from .streaming import check_complete, empty_model, freeze

AE_PARAMETERS = 83_819_683  # FLUX.1's AutoencoderKL (ae.safetensors): what stays on the device to sample
VAE_GROUPS_KEY = "loralab.norm_num_groups"  # our writers store it: shapes alone cannot tell it
WANTED = "FLUX.1's autoencoder (ComfyUI's models/vae/ae.safetensors)"
_BATCH_NORMED = "bn.running_mean"  # FLUX.2's VAE: the same layout with a batch-normed latent


def is_flux_ae(tensors):
    return is_ldm_autoencoder(tensors) and _BATCH_NORMED not in tensors


def check_file(path, setting="model.vae_path"):
    """The file's absolute path, after checking it exists and is FLUX.1's autoencoder."""
    return checked_file(path, setting, WANTED, is_flux_ae)


def load(path, dtype):
    """FLUX.1's ae from its file, after checking the file is one."""
    return load_vae(check_file(path), dtype)


def vae_config(tensors, metadata):
    """diffusers AutoencoderKL config of a BFL-layout autoencoder (FLUX's ae.safetensors)."""
    levels = count_layers(tensors, r"encoder\.down\.(\d+)\.")
    channels = tuple(tensors[f"encoder.down.{i}.block.0.conv2.weight"]["shape"][0] for i in range(levels))
    return {
        "in_channels": tensors["encoder.conv_in.weight"]["shape"][1],
        "out_channels": tensors["decoder.conv_out.weight"]["shape"][0],
        "latent_channels": tensors["decoder.conv_in.weight"]["shape"][1],
        "block_out_channels": channels,
        "layers_per_block": count_layers(tensors, r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "norm_num_groups": int(metadata.get(VAE_GROUPS_KEY, 32)),
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
        "scaling_factor": 0.3611, "shift_factor": 0.1159,
    }


def load_vae(path, dtype):
    """AutoencoderKL with FLUX.1's config (scaling 0.3611, shift 0.1159) from BFL keys. The VAE
    is small (160 MB for FLUX.1), so its weights are converted in one state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with SafetensorsFile(path) as source:
        config = vae_config(source.tensors, source.metadata)
        weights = {k: source.get(k, dtype) for k in source.keys() if not is_scale_key(k)}
    model = empty_model(lambda: AutoencoderKL(**config))
    converted = convert_ldm_vae_checkpoint(weights, config)
    del weights
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(f"model.vae_path: {path} does not fit FLUX.1's autoencoder (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    check_complete(model, "model.vae_path", path)
    return freeze(model)


# ---------------------------------------------------------------------------------------------
# diffusers' names <-> BFL's


def vae_key_to_bfl(key):
    """A diffusers AutoencoderKL key -> its name in BFL's ae.safetensors (LDM layout)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", key)
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                     ("to_out.0", "proj_out")):
        key = key.replace(f"attn_1.{old}.", f"attn_1.{new}.")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", r"up.U\1.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", r"up.U\1.upsample.", key)
    return key


def vae_to_bfl(shapes, levels):
    """{bfl key: (diffusers key, bfl shape)} of an AutoencoderKL (diffusers key -> shape); the
    decoder's up blocks run in reverse order in BFL's layout, and attention projections are
    1x1 convolutions there."""
    mapping = {}
    for key, shape in shapes.items():
        bfl = vae_key_to_bfl(key)
        bfl = re.sub(r"up\.U(\d+)\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.", bfl)
        if ".attn_1." in bfl and bfl.endswith(".weight") and len(shape) == 2:
            shape = (*shape, 1, 1)
        mapping[bfl] = (key, tuple(shape))
    return mapping
