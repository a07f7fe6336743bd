"""Load a Z-Image pipeline from local files only: a diffusers folder of ZImagePipeline
(Tongyi-MAI/Z-Image, Z-Image-Turbo or our tiny one)."""
from dataclasses import dataclass
import os

import torch

from ...dtypes import torch_dtype as to_torch_dtype
from ..flux.model import ModelError, quiet_loading  # TODO(contract): ModelError defined once


def check_model_folder(path):
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} is not a diffusers folder (no model_index.json). Give a "
                         "local Z-Image folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/); "
                         "`loralab make-tiny-model zimage DIR` writes a small one to try.")
    return path


def load_pipeline(model):
    """The ZImagePipeline of the resolved `model` section, every part frozen, in model.dtype."""
    from diffusers import ZImagePipeline

    dtype = to_torch_dtype(model["dtype"])
    folder = check_model_folder(model["path"])
    try:
        with quiet_loading():
            pipeline = ZImagePipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.path: could not load a Z-Image pipeline from {folder}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipeline.text_encoder_source = TextEncoderSource(folder, dtype)
    return pipeline


@dataclass(frozen=True)
class TextEncoderSource:
    """Where the Qwen3 text encoder came from, so that it can be freed after encoding (Qwen3-4B is
    about 8 GB in bf16) and loaded again for the next prompts instead of parked in RAM."""
    folder: str
    dtype: torch.dtype

    def load(self):
        from transformers import AutoModel

        with quiet_loading():
            encoder = AutoModel.from_pretrained(self.folder, subfolder="text_encoder", dtype=self.dtype,
                                                local_files_only=True)
        encoder.requires_grad_(False)
        return encoder.eval()
