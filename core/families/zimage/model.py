"""Load a Z-Image pipeline from local files only: a diffusers folder of ZImagePipeline
(Tongyi-MAI/Z-Image, Z-Image-Turbo or our tiny one), ComfyUI's single files replacing its parts,
or the three single files alone (single_files.py)."""
import os

from ...dtypes import torch_dtype as to_torch_dtype
from ..base import ModelError
from ..parts.loading import frozen, pipeline_from_folder
from ..parts.qwen3 import TextEncoderSource


def check_model_folder(path):
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} is not a diffusers folder (no model_index.json). Give a "
                         "local Z-Image folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/); "
                         "`loralab make-tiny-model zimage DIR` writes a small one to try.")
    return path


def load_pipeline(model, comfyui=None):
    """The ZImagePipeline of the resolved `model` section, every part frozen, in model.dtype."""
    from diffusers import ZImagePipeline

    from . import single_files

    dtype = to_torch_dtype(model["dtype"])
    files = [model.get(k) for k in ("transformer_path", "text_encoder_path", "vae_path")]
    if not model.get("path"):
        for key, given in zip(("transformer_path", "text_encoder_path", "vae_path"), files):
            if not given:
                raise ModelError(f"model.{key} is not set: without model.path, Z-Image needs its three "
                                 "single files (model.transformer_path, model.text_encoder_path, model.vae_path).")
        parts = single_files.load_parts(model, dtype)
        pipeline = ZImagePipeline(scheduler=single_files.scheduler(), tokenizer=single_files.load_tokenizer(comfyui, files),
                                  **parts)
        folder = None
    else:
        folder = check_model_folder(model["path"])
        parts = single_files.load_parts(model, dtype)
        pipeline = pipeline_from_folder(ZImagePipeline, folder, dtype, "a Z-Image", **parts)
    single_files.check_widths(pipeline, model)
    return frozen(pipeline, TextEncoderSource(folder, model.get("text_encoder_path"), dtype))
