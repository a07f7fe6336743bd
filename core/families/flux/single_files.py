"""FLUX.1 from the single files a ComfyUI user has (models/diffusion_models, text_encoders, vae):
each part is built empty on the meta device and filled tensor by tensor from the file, so no
random full-precision model is ever made and at most one tensor is read ahead of the model."""
import os
import re

import torch

from ..base import ModelError
from ..parts import autoencoder
from ..parts import fp8 as fp8_ops
from ..parts.files import SafetensorsFile, clip_prefix, count_layers
from ..parts.streaming import (check_complete, comfyui_candidates, empty_model, fill, freeze, identity_plan,
                               model_shapes)
from . import keys
from .file_layout import identify, strip_prefix, transformer_config

# metadata our writers store for what shapes alone cannot tell
CLIP_HEADS_KEY = "loralab.num_attention_heads"
CLIP_EOS_KEY = "loralab.eos_token_id"

SLOTS = {  # slot -> (setting, kind expected, what to give)
    "transformer": ("model.transformer_path", "flux_transformer",
                    "a FLUX.1 transformer file (ComfyUI's models/diffusion_models/flux1-dev.safetensors)"),
    "clip_l": ("model.clip_l_path", "clip_l",
               "the CLIP-L text encoder (ComfyUI's models/text_encoders/clip_l.safetensors)"),
    "t5": ("model.t5_path", "t5",
           "the T5-XXL text encoder (ComfyUI's models/text_encoders/t5xxl_fp16.safetensors "
           "or t5xxl_fp8_e4m3fn.safetensors)"),
    "vae": ("model.vae_path", "flux_vae", "FLUX.1's autoencoder (ComfyUI's models/vae/ae.safetensors)"),
}


def check_file(slot, path):
    """The file's absolute path, after checking it exists and looks like the part of `slot`."""
    setting, kind, wanted = SLOTS[slot]
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ModelError(f"{setting}: file not found: {path}. Give {wanted}.")
    try:
        found = identify(path)
    except (OSError, ValueError):
        found = "unknown"
    if found == "clip_l":  # CLIP-H and CLIP-G (SDXL's second encoder) have the same key layout
        tensors = SafetensorsFile(path).tensors
        width = tensors[clip_prefix(tensors) + "embeddings.token_embedding.weight"]["shape"][1]
        found = "clip_l" if width not in (1024, 1280) else "other_clip"
    if found != kind:
        from .. import describe_file

        raise ModelError(f"{setting}: {path} looks like {describe_file(path)}, not {wanted}. "
                         f"Give {wanted} in {setting}.")
    return path


# ---------------------------------------------------------------------------------------------
# The parts


def _bfl_plan(prefix, config, shapes, names):
    plan = []
    for bfl_key, diffusers_key, swap in keys._one_to_one(config["num_layers"], config["num_single_layers"]):
        plan.append((keys.stored_key(prefix + bfl_key, names), [(diffusers_key, None)], swap))
    for bfl_name, parts in keys.block_modules(config["num_layers"], config["num_single_layers"]):
        for suffix in ("weight", "bias"):
            targets = [(f"{p}.{suffix}", shapes[f"{p}.{suffix}"][0]) for p in parts
                       if f"{p}.{suffix}" in shapes]
            if targets:
                plan.append((f"{prefix}{bfl_name}.{suffix}", targets, False))
    return plan


def load_transformer(paths, dtype, quantize="none", setting="model.transformer_path"):
    """FluxTransformer2DModel from one file (BFL or diffusers keys) or the shards of a diffusers
    folder, its config read from the file. quantize "fp8" keeps the block linears in fp8; "nf4" and
    "int8" make them bitsandbytes layers after loading."""
    from diffusers import FluxTransformer2DModel

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    headers = [SafetensorsFile(p) for p in paths]
    tensors = {k: v for h in headers for k, v in h.tensors.items()}
    config = transformer_config(tensors, headers[0].metadata)
    model = empty_model(lambda: FluxTransformer2DModel.from_config(config))
    fp8_names = set(fp8_ops.replace_block_linears(model, dtype)) if quantize == "fp8" else set()
    shapes = model_shapes(model)
    prefix = strip_prefix(tensors)
    for header in headers:
        with header as source:
            if keys.is_bfl(tensors):
                plan = _bfl_plan(prefix, config, shapes, tensors)
            else:  # diffusers keys, behind a prefix where ComfyUI saved them
                plan = identity_plan(source, model, lambda k: k[len(prefix):] if k.startswith(prefix) else k)
            fill(model, source, plan, dtype, setting, fp8_names)
    check_complete(model, setting, paths[0])
    if quantize in ("nf4", "int8"):
        from ..parts.bnb import quantize_block_linears

        quantize_block_linears(model, quantize, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    return freeze(model)


def load_clip(path, dtype):
    """CLIPTextModel (CLIP-L), its config read from the shapes in the file."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with SafetensorsFile(path) as source:
        prefix = clip_prefix(source.tensors)
        shape = lambda k: source.tensors[prefix + k]["shape"]  # noqa: E731
        vocab, hidden = shape("embeddings.token_embedding.weight")
        meta = source.metadata
        config = CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden,
            intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=count_layers(source.tensors, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
            num_attention_heads=int(meta.get(CLIP_HEADS_KEY, hidden // 64)),
            max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
            projection_dim=hidden, hidden_act="quick_gelu",
            # 2: the original CLIP-L config, where the pooled token is the highest id (the end token)
            bos_token_id=0, eos_token_id=int(meta.get(CLIP_EOS_KEY, 2)), pad_token_id=1)
        model = empty_model(lambda: CLIPTextModel(config))
        inner = "text_model." if hasattr(model, "text_model") else ""
        plan = identity_plan(source, model, lambda k: inner + k[len(prefix):] if k.startswith(prefix) else k)
        fill(model, source, plan, dtype, "model.clip_l_path")
    check_complete(model, "model.clip_l_path", path)
    return freeze(model)


def load_t5(path, dtype):
    """T5EncoderModel, its config read from the shapes in the file; fp8 weights dequantised."""
    from transformers import T5Config, T5EncoderModel

    with SafetensorsFile(path) as source:
        names = source.tensors
        shape = lambda k: names[k]["shape"]  # noqa: E731
        embed_key = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"
        vocab, d_model = shape(embed_key)
        heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[1]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in names
        d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
        config = T5Config(
            vocab_size=vocab, d_model=d_model, d_ff=d_ff,
            d_kv=shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
            num_layers=count_layers(names, r"encoder\.block\.(\d+)\."), num_heads=heads,
            relative_attention_num_buckets=shape(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[0],
            feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = empty_model(lambda: T5EncoderModel(config))
        plan = [p for p in identity_plan(source, model) if p[0] != "encoder.embed_tokens.weight"]
        if embed_key != "shared.weight":
            plan.append((embed_key, [("shared.weight", vocab)], False))
        fill(model, source, plan, dtype, "model.t5_path")
    model.encoder.embed_tokens.weight = model.shared.weight
    check_complete(model, "model.t5_path", path)
    return freeze(model)


# ---------------------------------------------------------------------------------------------
# Tokenizers from ComfyUI's checkout

_CLIP_TOKENIZER = os.path.join("comfy", "sd1_tokenizer")
_T5_TOKENIZER = os.path.join("comfy", "text_encoders", "t5_tokenizer")


def load_tokenizers(comfyui=None, model_files=()):
    """(CLIPTokenizer, T5TokenizerFast) from ComfyUI's checkout."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    candidates = comfyui_candidates(comfyui, model_files)
    for base in candidates:
        clip_dir, t5_dir = os.path.join(base, _CLIP_TOKENIZER), os.path.join(base, _T5_TOKENIZER)
        if os.path.isfile(os.path.join(clip_dir, "vocab.json")) and \
                os.path.isfile(os.path.join(t5_dir, "tokenizer.json")):
            # FLUX.1 reads 77 CLIP tokens and at most 512 T5 tokens, whatever the files say
            return (CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True, model_max_length=77),
                    T5TokenizerFast.from_pretrained(t5_dir, local_files_only=True, model_max_length=512))
    raise ModelError(
        "The CLIP and T5 tokenizers were not found: they come with ComfyUI's source "
        f"({_CLIP_TOKENIZER} and {_T5_TOKENIZER}). Set the environment variable LORALAB_COMFYUI "
        "to ComfyUI's folder, or keep the model files in ComfyUI's models/ folder. Looked in: "
        + (", ".join(candidates) or "nowhere (no hint given)"))


# ---------------------------------------------------------------------------------------------
# The pipeline


def scheduler_for(guidance_embeds):
    """FLUX.1's flow-matching scheduler: dev shifts by resolution (dynamic shifting), schnell
    uses shift 1.0 and no dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def load_part(slot, path, dtype, quantize="none"):
    """One part from its single file, after checking the file is that part."""
    path = check_file(slot, path)
    if slot == "transformer":
        return load_transformer(path, dtype, quantize)
    return {"clip_l": load_clip, "t5": load_t5, "vae": autoencoder.load_vae}[slot](path, dtype)


def load_pipeline_from_files(transformer_path, clip_l_path, t5_path, vae_path, dtype=torch.bfloat16,
                             quantize="none", comfyui=None):
    """A FluxPipeline from the four single files (no diffusers folder); tokenizers come from
    ComfyUI's checkout. `dtype` is a torch dtype or "bf16"/"fp16"/"fp32"."""
    from diffusers import FluxPipeline

    from ...dtypes import torch_dtype

    dtype = torch_dtype(dtype)
    paths = {"transformer": transformer_path, "clip_l": clip_l_path, "t5": t5_path, "vae": vae_path}
    for slot, path in paths.items():
        if not path:
            raise ModelError(f"{SLOTS[slot][0]} is not set: without model.path, give {SLOTS[slot][2]}.")
        check_file(slot, path)
    tokenizer, tokenizer_2 = load_tokenizers(comfyui, list(paths.values()))
    transformer = load_part("transformer", transformer_path, dtype, quantize)
    pipeline = FluxPipeline(
        scheduler=scheduler_for(transformer.config.guidance_embeds),
        vae=load_part("vae", vae_path, dtype), text_encoder=load_part("clip_l", clip_l_path, dtype),
        tokenizer=tokenizer, text_encoder_2=load_part("t5", t5_path, dtype),
        tokenizer_2=tokenizer_2, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
