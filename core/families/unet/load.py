"""Load an SD1.5 / SDXL pipeline from local files only: a diffusers folder, or one single-file
checkpoint as ComfyUI keeps it (models/checkpoints), optionally with a separate VAE file
(models/vae). Single-file parts are built empty and filled from the file under their LDM names
(keys.py), their configs read from the shapes (files.py); tokenizers come from ComfyUI's source."""
from dataclasses import dataclass
import os

import torch

from ..base import ModelError
from . import files, keys
from .keys import HEADS_2_KEY, HEADS_KEY


PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TEXT_PARTS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _dtype(name):
    from ...dtypes import torch_dtype

    return torch_dtype(name)


# ---------------------------------------------------------------------------------------------
# Parts from a single file


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _fill(model, weights, setting, path):
    """Assigns {model key: tensor} (reshaped to the model's shapes: the LDM VAE's attention is
    1x1 convolutions) and checks that every weight of the model came from the file."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in list(weights.items()):
        if name in shapes and tensor.shape != shapes[name] and tensor.numel() == shapes[name].numel():
            weights[name] = tensor.reshape(shapes[name])
        elif name in shapes and tensor.shape != shapes[name]:
            raise ModelError(f"{setting}: {path}: {name} has shape {tuple(tensor.shape)} where the model "
                             f"needs {tuple(shapes[name])}")
    model.load_state_dict(weights, strict=False, assign=True)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p is not None and p.device.type == "meta"]
    if missing:
        raise ModelError(f"{setting}: {path} lacks {len(missing)} weights of the model it describes "
                         f"(e.g. {missing[:3]}); is the file complete?")
    model.requires_grad_(False)
    model.eval()
    return model


def _part(source, prefix, dtype):
    """{key without prefix: tensor in dtype} of the file's keys under `prefix`."""
    return {k[len(prefix):]: source.get(k, dtype) for k in source.keys() if k.startswith(prefix)}


def _shapes(source, prefix):
    return {k[len(prefix):]: tuple(v["shape"]) for k, v in source.tensors.items() if k.startswith(prefix)}


def _unet(source, family, dtype, pooled_width, path):
    from diffusers import UNet2DConditionModel

    config = files.unet_config(_shapes(source, keys.UNET_PREFIX), family, pooled_width)
    model = _empty(lambda: UNet2DConditionModel.from_config(config))
    names = keys.unet_to_ldm(model.state_dict().keys(), model.config)
    weights = {d: source.get(keys.UNET_PREFIX + ldm, dtype) for d, ldm in names.items()
               if keys.UNET_PREFIX + ldm in source}
    return _fill(model, weights, "model.checkpoint_path", path)


def _vae_from_ldm(source, prefix, family, dtype, setting):
    from diffusers import AutoencoderKL

    config = files.vae_config(_shapes(source, prefix), family)
    model = _empty(lambda: AutoencoderKL.from_config(config))
    mapping = keys.vae_to_ldm({k: v.shape for k, v in model.state_dict().items()},
                              len(config["block_out_channels"]))
    weights = {d: source.get(prefix + ldm, dtype) for ldm, (d, _) in mapping.items() if prefix + ldm in source}
    return _fill(model, weights, setting, source.path)


def _vae_from_diffusers(source, family, dtype):
    from diffusers import AutoencoderKL

    shapes = _shapes(source, "")
    levels = files._count(shapes, r"encoder\.down_blocks\.(\d+)\.")
    config = files.packaged_config(family, "vae")
    config.update(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
        block_out_channels=[shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)],
        layers_per_block=files._count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes)
    model = _empty(lambda: AutoencoderKL.from_config(config))
    return _fill(model, _part(source, "", dtype), "model.vae_path", source.path)


def load_vae_file(path, family, dtype):
    """An AutoencoderKL from a VAE file as ComfyUI keeps it in models/vae (LDM keys, e.g.
    sdxl_vae.safetensors, with or without `first_stage_model.`) or with diffusers keys."""
    from .. import describe_file as describe
    from ..parts.files import SafetensorsFile

    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ModelError(f"model.vae_path: file not found: {path}")
    source = SafetensorsFile(path)
    with source:
        if keys.is_diffusers_vae(source.keys()):
            return _vae_from_diffusers(source, family, _dtype(dtype))
        for prefix in (keys.VAE_PREFIX, ""):
            if prefix + "decoder.conv_in.weight" in source and prefix + "encoder.down.0.block.0.conv1.weight" in source:
                return _vae_from_ldm(source, prefix, family, _dtype(dtype), "model.vae_path")
    raise ModelError(f"model.vae_path: {path} looks like {describe(path)}, not a VAE (an autoencoder "
                     "with encoder.*/decoder.* keys, as ComfyUI's models/vae/sdxl_vae.safetensors).")


def _text_encoder(source, family, part, dtype):
    """CLIPTextModel (text_encoder) or CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if part == "text_encoder_2":
        weights = keys.openclip_to_diffusers(_part(source, keys.SDXL_OPENCLIP_PREFIX, dtype))
        heads, model_class = source.metadata.get(HEADS_2_KEY), CLIPTextModelWithProjection
    else:
        prefix = keys.SD15_CLIP_PREFIX if family == "sd15" else keys.SDXL_CLIP_PREFIX
        weights = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                   for k, v in _part(source, prefix, dtype).items()}
        weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
        heads, model_class = source.metadata.get(HEADS_KEY), CLIPTextModel
    config = files.clip_config({k: tuple(v.shape) for k, v in weights.items()}, family, part, heads)
    model = _empty(lambda: model_class(CLIPTextConfig(**config)))
    names = set(model.state_dict())
    weights = {(k if k in names else "text_model." + k): v for k, v in weights.items()}
    return _fill(model, weights, "model.checkpoint_path", source.path)


def load_text_encoders(path, family, dtype):
    """{"text_encoder": ..., ("text_encoder_2": ...)} from a single-file checkpoint."""
    from ..parts.files import SafetensorsFile

    with SafetensorsFile(path) as source:
        return {part: _text_encoder(source, family, part, _dtype(dtype)) for part in TEXT_PARTS[family]}


def load_tokenizers(family, comfyui=None, model_files=()):
    """CLIP's tokenizer(s) from ComfyUI's source (comfy/sd1_tokenizer); SDXL's second pads with "!"."""
    from transformers import CLIPTokenizer

    from ..parts.streaming import comfyui_candidates

    candidates = comfyui_candidates(comfyui, model_files)
    for base in candidates:
        folder = os.path.join(base, "comfy", "sd1_tokenizer")
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            load = lambda **extra: CLIPTokenizer.from_pretrained(  # noqa: E731
                folder, local_files_only=True, model_max_length=77, **extra)
            found = {"tokenizer": load()}
            if family == "sdxl":
                found["tokenizer_2"] = load(pad_token="!")
            return found
    raise ModelError(
        "The CLIP tokenizer was not found: for a single-file checkpoint it comes with ComfyUI's source "
        "(comfy/sd1_tokenizer). Set the environment variable LORALAB_COMFYUI to ComfyUI's folder, or "
        "keep the checkpoint in ComfyUI's models/checkpoints folder. Looked in: "
        + (", ".join(candidates) or "nowhere (no hint given)"))


def scheduler(family, prediction_type, base=None, zero_snr=False):
    """The scheduler: `base`'s class and config (a folder's), else the family's packaged one
    (Euler, SD's scaled-linear betas), carrying `prediction_type`."""
    from diffusers import EulerDiscreteScheduler

    if base is None:
        extra = {"rescale_betas_zero_snr": True} if zero_snr else {}
        return EulerDiscreteScheduler.from_config(files.packaged_config(family, "scheduler"),
                                                  prediction_type=prediction_type, **extra)
    return type(base).from_config(base.config, prediction_type=prediction_type)


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class TextEncoderSource:
    """Where a pipeline's text encoders came from, to load them again after they were freed."""
    family: str
    folder: str
    checkpoint: str
    dtype: torch.dtype

    def load(self):
        if self.checkpoint:
            return load_text_encoders(self.checkpoint, self.family, self.dtype)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        loaded = {}
        for part in TEXT_PARTS[self.family]:
            model = classes[part].from_pretrained(self.folder, subfolder=part, torch_dtype=self.dtype,
                                                  local_files_only=True)
            model.requires_grad_(False)
            model.eval()
            loaded[part] = model
        return loaded


def reload_text_encoders(pipeline):
    """Loads the text encoder(s) again from the folder or checkpoint they came from (after the
    family freed them with register_modules(text_encoder=None)), frozen, in the same dtype."""
    pipeline.register_modules(**pipeline.loralab_text_encoder_source.load())
    return pipeline


def _check_family(family, found, setting, path):
    if family not in files.FAMILIES:
        raise ModelError(f"model.family must be 'sd15' or 'sdxl' here, not {family!r}")
    if found["family"] != family:
        names = {"sd15": "SD1.5", "sdxl": "SDXL"}
        raise ModelError(f"{setting}: {path} is an {names[found['family']]} model, but model.family is "
                         f"{family!r}; set model.family to {found['family']!r}.")


def _detect(family, setting, path):
    try:
        found = files.detect(path)
    except ValueError as error:
        raise ModelError(f"{setting}: {error}") from error
    _check_family(family, found, setting, path)
    return found


def _from_folder(family, folder, dtype, parts):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..parts.loading import pipeline_from_folder

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    return pipeline_from_folder(pipeline_class, folder, dtype, f"an {family}", **extra, **parts)


def _from_checkpoint(family, path, dtype, comfyui, prediction):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..parts.files import SafetensorsFile

    from ..parts.files import read_header

    zero_snr = "ztsnr" in read_header(path)[0]  # ComfyUI's marker of zero-terminal-SNR models
    parts = dict(load_tokenizers(family, comfyui, [path]), scheduler=scheduler(family, prediction, zero_snr=zero_snr))
    parts.update(load_text_encoders(path, family, dtype))
    pooled = parts["text_encoder_2"].config.projection_dim if family == "sdxl" else None
    with SafetensorsFile(path) as source:
        parts["unet"] = _unet(source, family, dtype, pooled, path)
        parts["vae"] = _vae_from_ldm(source, keys.VAE_PREFIX, family, dtype, "model.checkpoint_path")
    if family == "sdxl":
        return StableDiffusionXLPipeline(force_zeros_for_empty_prompt=True, **parts)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)


def load_pipeline(family, model, comfyui=None):
    """StableDiffusionPipeline (sd15) or StableDiffusionXLPipeline (sdxl), every part frozen, from
    the resolved model section: `path` (a diffusers folder) or `checkpoint_path` (one file),
    `vae_path` (replaces the VAE), `dtype`, `prediction_type` ("auto" = detected), `clip_skip`
    (stored as pipeline.loralab_clip_skip). `comfyui`: ComfyUI's folder (its tokenizer)."""
    dtype = _dtype(model.get("dtype", "bf16"))
    folder, checkpoint = model.get("path"), model.get("checkpoint_path")
    if not folder and not checkpoint:
        raise ModelError("Give model.path (a diffusers folder) or model.checkpoint_path (a single-file "
                         "SD1.5/SDXL checkpoint, as in ComfyUI's models/checkpoints).")
    setting = "model.path" if folder else "model.checkpoint_path"
    where = os.path.abspath(os.path.expanduser(str(folder or checkpoint)))
    detected = _detect(family, setting, where)["prediction_type"]
    prediction = model.get("prediction_type") or "auto"
    prediction = detected if prediction == "auto" else prediction
    vae = load_vae_file(model["vae_path"], family, dtype) if model.get("vae_path") else None
    if folder:
        folder, checkpoint = where, None
        pipeline = _from_folder(family, folder, dtype, {"vae": vae} if vae else {})
        pipeline.register_modules(scheduler=scheduler(family, prediction, pipeline.scheduler))
    else:
        folder, checkpoint = None, where
        pipeline = _from_checkpoint(family, checkpoint, dtype, comfyui, prediction)
        if vae:
            pipeline.register_modules(vae=vae)
    for name in ("unet", "vae") + TEXT_PARTS[family]:
        part = getattr(pipeline, name)
        part.requires_grad_(False)
        part.eval()
    pipeline.set_progress_bar_config(disable=True)
    pipeline.loralab_clip_skip = model.get("clip_skip")
    pipeline.loralab_text_encoder_source = TextEncoderSource(family, folder, checkpoint, dtype)
    return pipeline
