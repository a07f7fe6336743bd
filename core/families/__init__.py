"""Model families: one folder each, core/families/<name>/, whose __init__.py exports FAMILY, an
instance of its ModelFamily subclass (base.py). NAMES is the one place family names are listed: a
new family is its folder and one word here. The first is the default where no model is named."""
import functools
import importlib
import json
import os

from .base import MemoryModel, ModelError, ModelFamily, RuleOfThumb

NAMES = ("flux", "sdxl", "sd15", "zimage", "qwen_image", "flux2")


@functools.cache
def get_family(name):
    """The family instance of a model.family name."""
    if name not in NAMES:
        raise ValueError(f"model.family = {name!r} is not supported; supported: {', '.join(NAMES)}.")
    return importlib.import_module(f".{name}", __name__).FAMILY


def family_or_default(name):
    """The family of a model.family value, or the default (the first) while it is still "auto":
    what a plan estimates before any model file is read."""
    return get_family(name if name in NAMES else NAMES[0])


def families():
    return [get_family(name) for name in NAMES]


def single_file_keys():
    """Every model-section key that names a single file, over all families, in a stable order."""
    return tuple(dict.fromkeys(key for family in families() for key in family.single_files))


def detect_family(model_cfg):
    """The family a model section's files are ("auto"): a built-in name, the single files (each
    family reads its own), or a diffusers folder's pipeline class. ValueError says what to set."""
    path = model_cfg.get("path")
    given = [key for key in single_file_keys() if model_cfg.get(key)]
    if given:
        claimed = [family.name for family in families() if family.claims_files(model_cfg)]
        if len(claimed) == 1:
            return claimed[0]
        # files that cannot be read yet (not there): the family whose keys they are, if only one
        takers = [family.name for family in families() if set(given) <= set(family.single_files)]
        if not claimed and len(takers) == 1 and not path:
            return takers[0]
    found = folder_family(path) if path else None
    if found:
        return found
    if path and os.path.isfile(os.path.join(os.path.expanduser(path), "model_index.json")):
        classes = [name for family in families() for name in family.pipeline_classes]
        raise ValueError(f"model.family is auto, and {path}/model_index.json names a pipeline that is "
                         f"none of {', '.join(classes)}: set model.family.")
    raise ValueError(f"model.family is auto, and no readable model file tells the family (model.path "
                     f"= {path!r}, {', '.join('model.' + key for key in given) or 'no single file'}): "
                     f"give a diffusers folder with model_index.json, the model's files, or set "
                     f"model.family to one of {', '.join(NAMES)}.")


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
        pipeline_class = json.load(f).get("_class_name", "")
    return next((family.name for family in families() if pipeline_class in family.pipeline_classes), None)


def describe_file(path):
    """What a .safetensors file looks like, in words: each family describes its own files, then
    the parts no one family owns (text encoders, autoencoders, LoRAs: parts/files.py)."""
    from .parts.files import describe_shared, read_header

    try:
        tensors, _ = read_header(path)
    except (OSError, ValueError) as error:
        return f"not a readable .safetensors file ({error})"
    for family in families():
        words = family.describe_file(tensors)
        if words:
            return words
    return describe_shared(tensors)


def model_files(model_cfg):
    """The local paths a model section names: its folder (a built-in one is built on first use)
    and its single files."""
    from .builtin import resolve_model_path

    folder = [resolve_model_path(model_cfg["path"])] if model_cfg["path"] else []
    return folder + [model_cfg[key] for key in single_file_keys() if model_cfg.get(key)]


def load_model(model_cfg, quantize, comfyui=None):
    """The family's pipeline from a model section (a diffusers folder and/or single files).
    `quantize` is already resolved from "auto" (core.memory); `comfyui` is ComfyUI's folder
    when the node layer knows it (tokenizers of single-file models)."""
    from .builtin import resolve_model_path

    path = resolve_model_path(model_cfg["path"]) if model_cfg["path"] else None
    return get_family(model_cfg["family"]).load({**model_cfg, "path": path}, quantize, comfyui)


__all__ = ["MemoryModel", "ModelError", "ModelFamily", "NAMES", "RuleOfThumb", "describe_file", "detect_family", "families",
           "family_or_default", "folder_family", "get_family", "load_model", "model_files", "single_file_keys"]
