"""Load a FLUX.2 klein pipeline from a local diffusers folder (black-forest-labs/FLUX.2-klein-*,
or our tiny one); ComfyUI's single files are not read yet."""
import os

from ...dtypes import torch_dtype as to_torch_dtype
from ..base import ModelError
from ..flux.model import quiet_loading


def check_model_folder(path):
    path = os.path.abspath(os.path.expanduser(path or ""))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} is not a diffusers folder (no model_index.json). Give a "
                         "local FLUX.2 klein folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/); "
                         "`loralab make-tiny-model flux2 DIR` writes a small one to try.")
    return path


def load_pipeline(model):
    """The Flux2KleinPipeline of the resolved `model` section, every part frozen, in model.dtype."""
    from diffusers import Flux2KleinPipeline

    folder = check_model_folder(model.get("path"))
    try:
        with quiet_loading():
            pipeline = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=to_torch_dtype(model["dtype"]),
                                                          local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.path: could not load a FLUX.2 klein pipeline from {folder}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipeline
