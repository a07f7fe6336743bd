"""Model families: one module each (load, encode, noise + target + loss, LoRA targets, sampling),
all on the contract in contract.py."""
import importlib
import json
import os

SUPPORTED = ("flux", "sdxl", "sd15", "zimage")

# The single files each family can load instead of (or over parts of) a diffusers folder; with
# all of `REQUIRED_FILES` given, no folder is needed.
SINGLE_FILES = ("transformer_path", "clip_l_path", "t5_path", "text_encoder_path", "vae_path", "checkpoint_path")
REQUIRED_FILES = {"flux": ("transformer_path", "clip_l_path", "t5_path", "vae_path"),
                  "sdxl": ("checkpoint_path",), "sd15": ("checkpoint_path",),
                  "zimage": ("transformer_path", "text_encoder_path", "vae_path")}
PIPELINE_CLASSES = {"FluxPipeline": "flux", "StableDiffusionXLPipeline": "sdxl",
                    "StableDiffusionPipeline": "sd15", "ZImagePipeline": "zimage"}


def get_family(name):
    if name not in SUPPORTED:
        raise ValueError(f"model.family = {name!r} is not supported; supported: {', '.join(SUPPORTED)}.")
    return importlib.import_module(f".{name}", __name__)


def detect_family(model_cfg):
    """The family a model section's files are ("auto"): a built-in name, a checkpoint's keys, the
    FLUX single files, or a diffusers folder's pipeline class. ValueError says what to set."""
    path, checkpoint = model_cfg.get("path"), model_cfg.get("checkpoint_path")
    if checkpoint:
        from .unet.files import detect

        return detect(checkpoint)["family"]
    transformer = model_cfg.get("transformer_path")
    if model_cfg.get("text_encoder_path") or (transformer and _is_zimage(transformer)):  # TODO(contract)
        return "zimage"
    if any(model_cfg.get(key) for key in ("transformer_path", "clip_l_path", "t5_path")):
        return "flux"
    found = folder_family(path) if path else None
    if found:
        return found
    if path and os.path.isfile(os.path.join(os.path.expanduser(path), "model_index.json")):
        raise ValueError(f"model.family is auto, and {path}/model_index.json names a pipeline that is "
                         f"none of {', '.join(PIPELINE_CLASSES)}: set model.family.")
    raise ValueError(f"model.family is auto, and no readable model file tells the family (model.path "
                     f"= {path!r}): give a diffusers folder with model_index.json, a checkpoint, "
                     f"or set model.family to one of {', '.join(SUPPORTED)}.")


def _is_zimage(path):
    from .zimage.single_files import is_zimage_transformer

    return os.path.isfile(os.path.expanduser(path)) and is_zimage_transformer(os.path.expanduser(path))


def folder_family(path):
    """The family of a built-in model name or of a diffusers folder's pipeline class; None when
    the folder has no model_index.json or names another pipeline."""
    from .builtin import BUILTIN_MODELS

    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path][0]
    index = os.path.join(os.path.expanduser(path), "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        return PIPELINE_CLASSES.get(json.load(f).get("_class_name", ""))


def model_files(model_cfg):
    """The local paths a model section names: its folder (a built-in one is built on first use)
    and its single files."""
    from .builtin import resolve_model_path

    folder = [resolve_model_path(model_cfg["path"])] if model_cfg["path"] else []
    return folder + [model_cfg[key] for key in SINGLE_FILES if model_cfg.get(key)]


def load_model(model_cfg, quantize, comfyui=None):
    """The family's pipeline from a model section (a diffusers folder and/or single files).
    `quantize` is already resolved from "auto" (core.coach.fit); `comfyui` is ComfyUI's folder
    when the node layer knows it (tokenizers of single-file models)."""
    from .builtin import resolve_model_path

    path = resolve_model_path(model_cfg["path"]) if model_cfg["path"] else None
    return get_family(model_cfg["family"]).load({**model_cfg, "path": path}, quantize, comfyui)
