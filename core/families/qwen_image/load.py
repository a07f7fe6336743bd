"""Load a Qwen-Image pipeline from local files only: a diffusers folder (Qwen/Qwen-Image,
Qwen-Image-2512), ComfyUI's files replacing its parts, or ComfyUI's three files alone
(files.py)."""
from dataclasses import dataclass

import torch

from ...dtypes import torch_dtype as to_torch_dtype
from ..parts import bnb, loading
from ..parts.loading import frozen, quiet_loading

PARTS = ("transformer_path", "text_encoder_path", "vae_path")


def check_model_folder(path):
    return loading.check_model_folder(
        path, "a local Qwen-Image diffusers folder (with model_index.json, transformer/, vae/, text_encoder/, "
              "tokenizer/); `loralab make-tiny-model qwen_image DIR` writes a small one to try.")


def load_pipeline(model, quantize="none", comfyui=None):
    """The frozen QwenImagePipeline of a resolved `model` section, in model.dtype. quantize
    "fp8" keeps the transformer's block linears in fp8 (as FLUX.1's), "nf4"/"int8" makes them
    bitsandbytes layers."""
    from diffusers import QwenImagePipeline

    from . import files

    dtype = to_torch_dtype(model["dtype"])
    folder = check_model_folder(model["path"]) if model.get("path") else None
    parts = {}
    if model.get("text_encoder_path"):
        parts["text_encoder"] = files.load_text_encoder(model["text_encoder_path"], dtype)
    if model.get("vae_path"):
        parts["vae"] = files.load_vae(model["vae_path"], dtype)
    if model.get("transformer_path") or quantize == "fp8":
        parts["transformer"] = files.load_transformer(model.get("transformer_path"), folder, dtype, quantize)
    source = TextEncoderSource(folder, model.get("text_encoder_path"), dtype)
    if folder is None:
        pipeline = QwenImagePipeline(scheduler=files.scheduler(), tokenizer=files.tokenizer(
            comfyui, [model.get(k) for k in PARTS]), **parts)
    else:
        pipeline = loading.pipeline_from_folder(QwenImagePipeline, folder, dtype, "a Qwen-Image", **parts)
    if quantize in ("nf4", "int8"):  # fp8 was streamed in above; bitsandbytes quantizes what loaded
        bnb.quantize_loaded(pipeline.transformer, quantize)
    return frozen(pipeline, source)


@dataclass(frozen=True)
class TextEncoderSource:
    """Where the pipeline's Qwen2.5-VL came from, so it can be freed after encoding (about 16 GB
    in bf16) and loaded again for the next prompts."""
    folder: str
    text_encoder_path: str
    dtype: torch.dtype

    def load(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        from . import files

        if self.text_encoder_path:
            module = files.load_text_encoder(self.text_encoder_path, self.dtype)
        else:
            with quiet_loading():
                module = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    self.folder, subfolder="text_encoder", torch_dtype=self.dtype, local_files_only=True)
        module.requires_grad_(False)
        module.eval()
        return module
