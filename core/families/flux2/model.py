"""Load a FLUX.2 klein pipeline from local files only: a diffusers folder (black-forest-labs/FLUX.2-klein-*,
or our tiny one), ComfyUI's single files replacing its parts, or the three single files alone
(files.py)."""
import os

from ...dtypes import torch_dtype as to_torch_dtype
from ..base import ModelError
from ..parts.loading import frozen, pipeline_from_folder
# the Qwen3 of a folder or a file, freed after encoding and loaded again: as Z-Image keeps it
from ..parts.qwen3 import TextEncoderSource

PARTS = ("transformer_path", "text_encoder_path", "vae_path")


def check_model_folder(path):
    path = os.path.abspath(os.path.expanduser(path or ""))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} is not a diffusers folder (no model_index.json). Give a "
                         "local FLUX.2 klein folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/) "
                         "or ComfyUI's three files (model.transformer_path, text_encoder_path, vae_path); "
                         "`loralab make-tiny-model flux2 DIR --comfyui` writes a small one of each to try.")
    return path


def is_distilled_name(path):
    """ComfyUI's files say by name only: flux-2-klein-4b is the step-distilled klein,
    flux-2-klein-base-4b the base."""
    name = os.path.basename(str(path or "")).lower()
    return "klein" in name and "base" not in name


def scheduler():
    """klein's scheduler_config.json: the shift is computed per image size (the pipeline's mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def load_pipeline(model, comfyui=None):
    """The Flux2KleinPipeline of the resolved `model` section, every part frozen, in model.dtype."""
    from diffusers import Flux2KleinPipeline

    from . import files

    dtype = to_torch_dtype(model["dtype"])
    folder = check_model_folder(model["path"]) if model.get("path") else None
    if folder is None:
        for key in PARTS:
            if not model.get(key):
                raise ModelError(f"model.{key} is not set: without model.path, FLUX.2 klein needs its three single "
                                 "files (model.transformer_path, model.text_encoder_path, model.vae_path).")
    parts = {}
    if model.get("transformer_path"):
        parts["transformer"] = files.load_transformer(model["transformer_path"], dtype)
    if model.get("text_encoder_path"):
        parts["text_encoder"] = files.load_text_encoder(model["text_encoder_path"], dtype)
    if model.get("vae_path"):
        parts["vae"] = files.load_vae(model["vae_path"], dtype)
    if folder is None:
        pipeline = Flux2KleinPipeline(scheduler=scheduler(), tokenizer=files.load_tokenizer(
            comfyui, [model.get(k) for k in PARTS]), is_distilled=is_distilled_name(model["transformer_path"]), **parts)
    else:
        pipeline = pipeline_from_folder(Flux2KleinPipeline, folder, dtype, "a FLUX.2 klein", **parts)
    files.check_widths(pipeline, model)
    return frozen(pipeline, TextEncoderSource(folder, model.get("text_encoder_path"), dtype))
