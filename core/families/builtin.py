"""Built-in model and dataset names (`builtin:tiny-flux`, `builtin:demo`, `builtin:demo-shapes`) that the project
makes locally on first use, so the quickstart runs on a fresh machine with no download.

`builtin:tiny-flux` is the pretrained shapes model (core/families/flux/shapes), which draws
what it is asked; `builtin:random-flux`, `small-flux`, `tiny-sdxl` and `tiny-sd15` are random
weights of the same kind, for tries and tests that need only speed."""
import functools
import hashlib
import os

BUILTIN_MODELS = {"builtin:tiny-flux": ("flux", "shapes"), "builtin:random-flux": ("flux", "tiny"),
                  "builtin:small-flux": ("flux", "small"),
                  "builtin:tiny-sdxl": ("sdxl", "tiny"), "builtin:tiny-sd15": ("sd15", "tiny"),
                  "builtin:tiny-zimage": ("zimage", "tiny")}
# name: (folder in the cache, image count, the function in core/dataset/demo.py that draws it); a
# new drawing gets a new folder, never an old one's
BUILTIN_DATASETS = {"builtin:demo": ("demo-star", 8, "make_demo_dataset"),
                    "builtin:demo-shapes": ("demo-shapes", 16, "make_shapes_dataset")}


def cache_root():
    return os.environ.get("LORALAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loralab")


def _build_once(folder, marker, build):
    if not os.path.isfile(os.path.join(folder, marker)):
        temporary = folder + f".tmp-{os.getpid()}"
        build(temporary)
        if not os.path.isfile(os.path.join(folder, marker)):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            if os.path.isdir(folder):
                import shutil
                shutil.rmtree(folder)
            os.replace(temporary, folder)
    return folder


def resolve_model_path(path):
    """A local path as given, or the folder of a built-in model (built on first use)."""
    if path not in BUILTIN_MODELS:
        return path
    family, preset = BUILTIN_MODELS[path]
    folder = os.path.join(cache_root(), "models", f"{preset}-{family}")
    if preset == "shapes":  # the pretrained one, unpacked from the file the package ships
        from .flux.shapes.packed import TEXT_LENGTH, build_shapes_flux

        return _build_once(f"{folder}-{_shipped_stamp()}-t{TEXT_LENGTH}", "model_index.json", build_shapes_flux)
    from . import get_family

    return _build_once(folder, "model_index.json", lambda target: get_family(family).make_tiny(target, preset))


@functools.cache
def _shipped_stamp():
    """A short hash of the shipped shapes model: a new file unpacks into a new folder. Hashed once
    per process (the file is 11 MB, and every config that names it resolves it)."""
    from .flux.shapes import SHIPPED

    with open(SHIPPED, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def resolve_dataset_folder(folder):
    if folder not in BUILTIN_DATASETS:
        return folder
    from ..dataset import demo

    name, count, draw = BUILTIN_DATASETS[folder]
    return _build_once(os.path.join(cache_root(), "datasets", name), "image_000.txt",
                       lambda path: getattr(demo, draw)(path, count=count))
