"""Model families: one module each (load, encode, noise + target + loss, LoRA targets, sampling)."""
import importlib

SUPPORTED = ("flux",)


def get_family(name):
    if name not in SUPPORTED:
        raise ValueError(f"model.family = {name!r} is not supported yet; supported: "
                         f"{', '.join(SUPPORTED)} (SDXL and SD1.5 are planned).")
    return importlib.import_module(f".{name}", __name__)


SINGLE_FILES = ("transformer_path", "clip_l_path", "t5_path", "vae_path")


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
    files = {key: model_cfg.get(key) for key in SINGLE_FILES[1:] if model_cfg.get(key)}
    return get_family(model_cfg["family"]).load(path, model_cfg.get("transformer_path"),
                                                 model_cfg["dtype"], quantize, comfyui=comfyui, **files)
