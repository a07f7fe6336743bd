"""Load a FLUX.1 pipeline from local files only: a diffusers folder, single files as ComfyUI
keeps them (models/diffusion_models, text_encoders, vae) replacing its parts, or the single files
alone (see single_files.py)."""
from dataclasses import dataclass

import torch

from ...dtypes import torch_dtype as to_torch_dtype
from ..base import ModelError
from ..parts.files import folder_transformer_files
from ..parts import loading
from ..parts.loading import quiet_loading


def check_model_folder(path):
    return loading.check_model_folder(
        path, "a local FLUX.1 diffusers folder (with model_index.json, transformer/, vae/, text_encoder/, "
              "text_encoder_2/); `loralab make-tiny-model flux DIR` writes a small one to try.")


def load_transformer_file(file_path, folder=None, dtype=torch.bfloat16, quantize="none"):
    """A single-file transformer with BFL keys (ComfyUI's models/diffusion_models) or diffusers
    keys, fp8 or not, streamed into an empty model whose config is read from the file (dev or
    schnell, block counts). `folder` is unused: the file says what it is."""
    from .single_files import load_part

    return load_part("transformer", file_path, dtype, quantize)


def _quantized_transformer(folder, quantize, dtype):
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    if quantize == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    try:
        return FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=config, torch_dtype=dtype,
            local_files_only=True)
    except Exception as error:
        raise ModelError(f"model.quantize = {quantize!r} failed ({error}). bitsandbytes "
                         "quantization needs a CUDA GPU; set model.quantize to \"none\".") from error


def load_pipeline(path, transformer_path=None, dtype="bf16", quantize="none", clip_l_path=None,
                  t5_path=None, vae_path=None, comfyui=None):
    """The FLUX.1 pipeline, every part loaded from local files in `dtype`: a diffusers folder
    (`path`), single files (ComfyUI's) replacing its parts, or the four single files alone.
    quantize: "none", "fp8" (block linears kept in fp8), "nf4"/"int8" (bitsandbytes, CUDA).
    comfyui: ComfyUI's folder, where the four files' tokenizers are looked for first."""
    from diffusers import FluxPipeline

    from . import single_files

    torch_dtype = to_torch_dtype(dtype)
    if not path:
        pipeline = single_files.load_pipeline_from_files(transformer_path, clip_l_path, t5_path,
                                                         vae_path, torch_dtype, quantize, comfyui)
        return _frozen(pipeline, TextEncoderSource(None, clip_l_path, t5_path, torch_dtype))
    folder = check_model_folder(path)
    parts = {}
    for name, slot, file in (("text_encoder", "clip_l", clip_l_path), ("text_encoder_2", "t5", t5_path),
                             ("vae", "vae", vae_path)):
        if file:
            parts[name] = single_files.load_part(slot, file, torch_dtype)
    if transformer_path:
        parts["transformer"] = load_transformer_file(transformer_path, folder, torch_dtype, quantize)
    elif quantize == "fp8":
        shards = folder_transformer_files(folder)
        if not shards:
            raise ModelError(f"model.quantize = \"fp8\": {folder}/transformer has no .safetensors "
                             "weights to convert; give model.transformer_path or set model.quantize "
                             "to \"none\".")
        parts["transformer"] = single_files.load_transformer(shards, torch_dtype, "fp8", "model.path")
    elif quantize in ("nf4", "int8"):
        parts["transformer"] = _quantized_transformer(folder, quantize, torch_dtype)
    if transformer_path:  # dev or schnell: the file says, not the folder
        parts["scheduler"] = single_files.scheduler_for(parts["transformer"].config.guidance_embeds)
    pipeline = loading.pipeline_from_folder(FluxPipeline, folder, torch_dtype, "a FLUX.1", **parts)
    return _frozen(pipeline, TextEncoderSource(folder, clip_l_path, t5_path, torch_dtype))


@dataclass(frozen=True)
class TextEncoderSource:
    """Where a pipeline's CLIP-L and T5 came from, so they can be freed after encoding (T5-XXL is
    about 9 GB in bf16) and loaded again for the next prompts instead of parked in RAM."""
    folder: str
    clip_l_path: str
    t5_path: str
    dtype: torch.dtype

    def load(self):
        """(CLIP-L, T5), frozen, from the single files or the folder's text_encoder(_2)."""
        from transformers import CLIPTextModel, T5EncoderModel

        from . import single_files

        def part(slot, file, subfolder, model_class):
            if file:
                return single_files.load_part(slot, file, self.dtype)
            with quiet_loading():
                return model_class.from_pretrained(self.folder, subfolder=subfolder,
                                                   torch_dtype=self.dtype, local_files_only=True)

        encoders = (part("clip_l", self.clip_l_path, "text_encoder", CLIPTextModel),
                    part("t5", self.t5_path, "text_encoder_2", T5EncoderModel))
        for module in encoders:
            module.requires_grad_(False)
            module.eval()
        return encoders


def _frozen(pipeline, text_encoder_source):
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    pipeline.text_encoder_source = text_encoder_source
    return pipeline
