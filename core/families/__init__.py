"""Model families: one module each (load, encode, noise + target + loss, LoRA targets, sampling)."""
import importlib

SUPPORTED = ("flux",)


def get_family(name):
    if name not in SUPPORTED:
        raise ValueError(f"model.family = {name!r} is not supported yet; supported: "
                         f"{', '.join(SUPPORTED)} (SDXL and SD1.5 are planned).")
    return importlib.import_module(f".{name}", __name__)
