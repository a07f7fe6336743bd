"""Load a FLUX.1 pipeline from local files only: a diffusers folder, optionally with a
single-file transformer (BFL keys, as ComfyUI keeps it in models/diffusion_models)."""
import contextlib
import os
import warnings

import torch

from . import keys
from .flow import DTYPES


class ModelError(ValueError):
    """A model path that cannot be loaded; the message names the setting and what to do."""


def check_model_folder(path):
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ModelError(f"model.path: {path} is not a folder. Give a local FLUX.1 diffusers folder "
                         "(with model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/); "
                         "`loralab make-tiny-model flux DIR` writes a small one to try.")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} has no model_index.json, so it is not a diffusers "
                         "folder. Point it at the folder that holds model_index.json.")
    return path


def load_transformer_file(file_path, folder, dtype):
    """A single-file transformer with BFL keys (ComfyUI's models/diffusion_models) or diffusers
    keys, shaped by the folder's transformer config."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    if not os.path.isfile(file_path):
        raise ModelError(f"model.transformer_path: file not found: {file_path}")
    config = FluxTransformer2DModel.load_config(os.path.join(folder, "transformer"))
    transformer = FluxTransformer2DModel.from_config(config)
    weights = load_file(file_path)
    if keys.is_bfl(weights):
        shapes = {k: v.shape for k, v in transformer.state_dict().items()}
        weights = keys.bfl_to_transformer(weights, shapes, config["num_layers"],
                                          config["num_single_layers"])
    missing, unexpected = transformer.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelError(f"model.transformer_path: {file_path} does not fit the transformer of "
                         f"{folder} (missing {len(missing)} keys, e.g. {missing[:2]}; unexpected "
                         f"{len(unexpected)}, e.g. {unexpected[:2]}). Is it a FLUX.1 transformer of "
                         "the same variant (dev/schnell) as the folder?")
    return transformer.to(dtype)


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


@contextlib.contextmanager
def quiet_loading():
    """No per-file progress bars or renamed-argument notices from diffusers/transformers while
    loading: our own progress output says what is loading."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        import transformers.utils.logging as transformers_logging
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def load_pipeline(path, transformer_path=None, dtype="bf16", quantize="none"):
    """The FLUX.1 pipeline, every part loaded from local files in `dtype`."""
    from diffusers import FluxPipeline

    folder = check_model_folder(path)
    torch_dtype = DTYPES[dtype]
    parts = {}
    if transformer_path:
        parts["transformer"] = load_transformer_file(transformer_path, folder, torch_dtype)
    elif quantize != "none":
        parts["transformer"] = _quantized_transformer(folder, quantize, torch_dtype)
    try:
        with quiet_loading():
            pipeline = FluxPipeline.from_pretrained(folder, torch_dtype=torch_dtype,
                                                    local_files_only=True, **parts)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.path: could not load a FLUX.1 pipeline from {folder}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    return pipeline
