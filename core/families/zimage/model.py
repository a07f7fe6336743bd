"""Load a Z-Image pipeline from local files only: a diffusers folder of ZImagePipeline
(Tongyi-MAI/Z-Image, Z-Image-Turbo or our tiny one), ComfyUI's single files replacing its parts,
or the three single files alone (single_files.py)."""
from dataclasses import dataclass
import os

import torch

from ...dtypes import torch_dtype as to_torch_dtype
from ..base import ModelError
from ..flux.model import quiet_loading


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
        try:
            with quiet_loading():
                pipeline = ZImagePipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **parts)
        except (OSError, ValueError) as error:
            raise ModelError(f"model.path: could not load a Z-Image pipeline from {folder}: {error}") from error
    single_files.check_widths(pipeline, model)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipeline.text_encoder_source = TextEncoderSource(folder, model.get("text_encoder_path"), dtype)
    return pipeline


@dataclass(frozen=True)
class TextEncoderSource:
    """Where the Qwen3 text encoder came from, so that it can be freed after encoding (Qwen3-4B is
    about 8 GB in bf16) and loaded again for the next prompts instead of parked in RAM."""
    folder: str
    file: str
    dtype: torch.dtype

    def load(self):
        from transformers import AutoModel

        from .single_files import load_text_encoder

        if self.file:
            return load_text_encoder(self.file, self.dtype)
        with quiet_loading():
            encoder = AutoModel.from_pretrained(self.folder, subfolder="text_encoder", dtype=self.dtype,
                                                local_files_only=True)
        encoder.requires_grad_(False)
        return encoder.eval()
