"""The shapes of a family's transformer for its memory model, read without loading a weight: from a
single file's header, a diffusers folder's config and shard headers, or the family's reference."""
import glob
import json
import math
import os


def transformer_shape(model, shape_of, file_config, reference, reference_source):
    """(shape, source) of a `model` section's transformer, for the families whose memory model
    reads one: a single transformer file's header (`file_config(tensors, metadata)` gives its
    config, None when it is another kind of file: the loader names it), else a local diffusers
    folder's transformer/config.json and shard headers, else `reference()` (config, parameters).
    `shape_of(config, parameters)` makes the family's shape dict."""
    from ..builtin import BUILTIN_MODELS, resolve_model_path
    from .files import is_scale_key, read_header

    path, file = model.get("path"), model.get("transformer_path")
    if path in BUILTIN_MODELS:
        path = resolve_model_path(path)
    if file and os.path.isfile(file):
        tensors, metadata = read_header(file)
        config = file_config(tensors, metadata)
        if config is not None:
            parameters = sum(math.prod(v["shape"]) for k, v in tensors.items() if not is_scale_key(k))
            return shape_of(config, parameters), file
    config_path = os.path.join(path or "", "transformer", "config.json")
    if path and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        files = glob.glob(os.path.join(path, "transformer", "*.safetensors"))
        parameters = sum(math.prod(info["shape"]) for name in files for info in read_header(name)[0].values())
        return shape_of(config, parameters), config_path
    return shape_of(*reference()), reference_source
