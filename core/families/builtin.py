"""Built-in model names (`builtin:tiny-flux`, ...) that the project makes locally on first use, so
the quickstart runs on a fresh machine with no download (the built-in datasets: core/demo).

`builtin:tiny-flux` is the pretrained shapes model (core/families/flux/shapes), which draws
what it is asked; `builtin:random-flux`, `small-flux`, `tiny-sdxl`, `tiny-sd15` and
`tiny-qwen-image`, `tiny-zimage` and `tiny-flux2` are random
weights of the same kind, for tries and tests that need only speed."""
import functools
import hashlib
import os

BUILTIN_MODELS = {"builtin:tiny-flux": ("flux", "shapes"), "builtin:random-flux": ("flux", "tiny"),
                  "builtin:small-flux": ("flux", "small"),
                  "builtin:tiny-sdxl": ("sdxl", "tiny"), "builtin:tiny-sd15": ("sd15", "tiny"),
                  "builtin:tiny-qwen-image": ("qwen_image", "tiny"),
                  "builtin:tiny-zimage": ("zimage", "tiny"), "builtin:tiny-flux2": ("flux2", "tiny")}


# A random model's cached folder carries this: bumped when a tiny builder changes, so a cache built
# by an older release is not used (2: tiny-zimage's rope table reaches 1024 px)
RANDOM_REVISION = 2


def cache_root():
    return os.environ.get("LORALAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loralab")


def build_once(folder, marker, build):
    """`folder`, built by build(temporary folder) unless it holds `marker`; renamed into place."""
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

        return build_once(f"{folder}-{_shipped_stamp()}-t{TEXT_LENGTH}", "model_index.json", build_shapes_flux)
    from . import get_family

    return build_once(f"{folder}-r{RANDOM_REVISION}", "model_index.json",
                      lambda target: get_family(family).make_tiny(target, preset))


@functools.cache
def _shipped_stamp():
    """A short hash of the shipped shapes model: a new file unpacks into a new folder. Hashed once
    per process (the file is 11 MB, and every config that names it resolves it)."""
    from .flux.shapes import SHIPPED

    with open(SHIPPED, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]

