"""FLUX.1 from the single files a ComfyUI user has (models/diffusion_models, text_encoders, vae):
each part is built empty on the meta device and filled tensor by tensor from the file, so no
random full-precision model is ever made and at most one tensor is read ahead of the model."""
import json
import math
import os
import re

import torch
from torch import nn

from ..base import ModelError
from . import fp8 as fp8_ops
from . import keys
from .files import (DTYPES, FP8_NAMES, SafetensorsFile, clip_prefix, dequantize, describe, identify,
                    is_scale_key, strip_prefix, transformer_config)

# metadata our writers store for what shapes alone cannot tell
CLIP_HEADS_KEY = "loralab.num_attention_heads"
CLIP_EOS_KEY = "loralab.eos_token_id"
VAE_GROUPS_KEY = "loralab.norm_num_groups"

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
        raise ModelError(f"{setting}: {path} looks like {describe(path)}, not {wanted}. "
                         f"Give {wanted} in {setting}.")
    return path


def _count_layers(names, pattern):
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in map(regex.match, names) if m}
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------
# Filling a meta-device model


def _assign(model, name, tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(name)


def _shapes(model):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if b is not None})
    return shapes


def _check_complete(model, setting, path):
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p is not None and p.device.type == "meta"]
    if missing:
        raise ModelError(f"{setting}: {path} lacks {len(missing)} weights of the model it describes "
                         f"(e.g. {missing[:3]}); is the file complete?")


def _fill(model, source, plan, dtype, setting, fp8_names=()):
    """Assigns every planned tensor: plan is [(file key, [(model name, rows)], swap halves)];
    a fused file tensor is split by rows. Weights of `fp8_names` (Float8Linear layers) stay fp8."""
    shapes = _shapes(model)
    for file_key, targets, swap in plan:
        if file_key not in source:
            continue
        fp8_targets = [n for n, _ in targets if n[:-len(".weight")] in fp8_names and n.endswith(".weight")]
        if fp8_targets and len(fp8_targets) == len(targets) and not swap and \
                source.tensors[file_key]["dtype"] not in FP8_NAMES:
            # quantize "fp8" of a full-precision file: each weight made fp8 as it is read
            for (name, _), (weight, scale) in zip(targets, _fp8_pieces(source, file_key, [r for _, r in targets])):
                if tuple(weight.shape) != shapes[name]:
                    raise ModelError(f"{setting}: {source.path}: {file_key} has shape {tuple(weight.shape)} "
                                     f"where the model needs {shapes[name]} for {name}")
                model.get_submodule(name[:-len(".weight")]).set_weight(weight, scale)
            continue
        raw = source.raw(file_key)
        if fp8_targets and raw.dtype in (torch.float8_e4m3fn,):
            scale_key = source.scale_of(file_key)
            scale = source.raw(scale_key).float() if scale_key else torch.ones(1)
            pieces = _split(raw, [r for _, r in targets])
            scales = _split(scale, [r for _, r in targets]) if scale.numel() > 1 else [scale] * len(pieces)
            for (name, _), piece, piece_scale in zip(targets, pieces, scales):
                model.get_submodule(name[:-len(".weight")]).set_weight(piece, piece_scale)
            continue
        tensor = _converted(source, file_key, raw, dtype)  # from the bytes read: never a second read
        del raw
        if swap:
            tensor = keys._swap_halves(tensor)
        for (name, _), piece in zip(targets, _split(tensor, [r for _, r in targets])):
            if name not in shapes:
                continue
            if tuple(piece.shape) != shapes[name]:
                raise ModelError(f"{setting}: {source.path}: {file_key} has shape {tuple(piece.shape)} "
                                 f"where the model needs {shapes[name]} for {name}")
            if name[:-len(".weight")] in fp8_names and name.endswith(".weight"):
                model.get_submodule(name[:-len(".weight")]).set_weight(piece)
            else:
                _assign(model, name, piece)


def _converted(source, file_key, raw, dtype):
    """SafetensorsFile.get's value (fp8 dequantised with its scale, floats in `dtype`) of a tensor
    already read as `raw`; a bf16 tensor loaded in bf16 keeps its buffer, so the largest tensor (a
    7B text encoder's 1 GB embedding) is never in memory twice."""
    if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = source.scale_of(file_key)
        return dequantize(raw, source.raw(scale) if scale else None, dtype or torch.float32)
    return raw.to(dtype) if raw.is_floating_point() and dtype is not None else raw


def _fp8_pieces(source, file_key, rows, block_bytes=16 << 20):
    """[(fp8 weight, float32 scale)] of each row range `rows` of a full-precision file tensor,
    equal to fp8.to_fp8 of each piece, read from the file a block of rows at a time into one
    reused buffer (twice: the scale needs the largest magnitude first). Neither the whole tensor
    nor a float32 copy of it is ever in memory (to_fp8 of a whole bf16 weight holds 6x its bytes
    at once), and no buffer is freed between the fp8 weights kept, which would fragment the heap."""
    info = source.tensors[file_key]
    dtype, shape = DTYPES[info["dtype"]], info["shape"]
    row_size = math.prod(shape[1:])
    row_bytes = row_size * torch.empty(0, dtype=dtype).element_size()
    block = max(1, block_bytes // (row_size * 4))
    buffer = bytearray(block * row_bytes)
    stored = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(block, *shape[1:])
    work = torch.empty((block, *shape[1:]), dtype=torch.float32)

    def read(start, stop):
        source.read_rows(file_key, start, stop, buffer)
        return stored[:stop - start]

    rows = [shape[0]] if len(rows) == 1 else rows
    pieces, first = [], 0
    for count in rows:
        amax = torch.zeros((), dtype=torch.float32)
        for start in range(first, first + count, block):
            low, high = torch.aminmax(read(start, min(start + block, first + count)))
            amax = torch.maximum(amax, torch.maximum(low.abs(), high.abs()).float())
        scale = (amax / fp8_ops.FP8_MAX).clamp(min=1e-12) if amax > 0 else torch.tensor(1.0)
        weight = torch.empty((count, *shape[1:]), dtype=fp8_ops.FP8)
        for start in range(first, first + count, block):
            part = read(start, min(start + block, first + count))
            scaled = work[:len(part)].copy_(part).div_(scale).clamp_(-fp8_ops.FP8_MAX, fp8_ops.FP8_MAX)
            weight[start - first:start - first + len(part)].copy_(scaled)
        pieces.append((weight, scale.reshape(1).float()))
        first += count
    return pieces


def _split(tensor, rows):
    if len(rows) == 1:
        return [tensor]
    return list(torch.split(tensor, rows, dim=0))


def _identity_plan(source, model, rename=lambda k: k):
    shapes = _shapes(model)
    plan = []
    for key in source.keys():
        if is_scale_key(key):
            continue
        name = rename(key)
        if name in shapes:
            plan.append((key, [(name, shapes[name][0] if shapes[name] else 1)], False))
    return plan


# ---------------------------------------------------------------------------------------------
# The parts


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


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
    model = _empty(lambda: FluxTransformer2DModel.from_config(config))
    fp8_names = set(fp8_ops.replace_block_linears(model, dtype)) if quantize == "fp8" else set()
    shapes = _shapes(model)
    prefix = strip_prefix(tensors)
    for header in headers:
        with header as source:
            if keys.is_bfl(tensors):
                plan = _bfl_plan(prefix, config, shapes, tensors)
            else:  # diffusers keys, behind a prefix where ComfyUI saved them
                plan = _identity_plan(source, model, lambda k: k[len(prefix):] if k.startswith(prefix) else k)
            _fill(model, source, plan, dtype, setting, fp8_names)
    _check_complete(model, setting, paths[0])
    if quantize in ("nf4", "int8"):
        from .bnb import quantize_block_linears

        quantize_block_linears(model, quantize, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    return _frozen(model)


def _frozen(model):
    model.requires_grad_(False)
    model.eval()
    return model


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
            num_hidden_layers=_count_layers(source.tensors, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
            num_attention_heads=int(meta.get(CLIP_HEADS_KEY, hidden // 64)),
            max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
            projection_dim=hidden, hidden_act="quick_gelu",
            # 2: the original CLIP-L config, where the pooled token is the highest id (the end token)
            bos_token_id=0, eos_token_id=int(meta.get(CLIP_EOS_KEY, 2)), pad_token_id=1)
        model = _empty(lambda: CLIPTextModel(config))
        inner = "text_model." if hasattr(model, "text_model") else ""
        plan = _identity_plan(source, model, lambda k: inner + k[len(prefix):] if k.startswith(prefix) else k)
        _fill(model, source, plan, dtype, "model.clip_l_path")
    _check_complete(model, "model.clip_l_path", path)
    return _frozen(model)


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
            num_layers=_count_layers(names, r"encoder\.block\.(\d+)\."), num_heads=heads,
            relative_attention_num_buckets=shape(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[0],
            feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = _empty(lambda: T5EncoderModel(config))
        plan = [p for p in _identity_plan(source, model) if p[0] != "encoder.embed_tokens.weight"]
        if embed_key != "shared.weight":
            plan.append((embed_key, [("shared.weight", vocab)], False))
        _fill(model, source, plan, dtype, "model.t5_path")
    model.encoder.embed_tokens.weight = model.shared.weight
    _check_complete(model, "model.t5_path", path)
    return _frozen(model)


def vae_config(tensors, metadata):
    """diffusers AutoencoderKL config of a BFL-layout autoencoder (FLUX's ae.safetensors)."""
    levels = _count_layers(tensors, r"encoder\.down\.(\d+)\.")
    channels = tuple(tensors[f"encoder.down.{i}.block.0.conv2.weight"]["shape"][0] for i in range(levels))
    return {
        "in_channels": tensors["encoder.conv_in.weight"]["shape"][1],
        "out_channels": tensors["decoder.conv_out.weight"]["shape"][0],
        "latent_channels": tensors["decoder.conv_in.weight"]["shape"][1],
        "block_out_channels": channels,
        "layers_per_block": _count_layers(tensors, r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "norm_num_groups": int(metadata.get(VAE_GROUPS_KEY, 32)),
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
        "scaling_factor": 0.3611, "shift_factor": 0.1159,
    }


def load_vae(path, dtype):
    """AutoencoderKL with FLUX.1's config (scaling 0.3611, shift 0.1159) from BFL keys. The VAE
    is small (160 MB for FLUX.1), so its weights are converted in one state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with SafetensorsFile(path) as source:
        config = vae_config(source.tensors, source.metadata)
        weights = {k: source.get(k, dtype) for k in source.keys() if not is_scale_key(k)}
    model = _empty(lambda: AutoencoderKL(**config))
    converted = convert_ldm_vae_checkpoint(weights, config)
    del weights
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(f"model.vae_path: {path} does not fit FLUX.1's autoencoder (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    _check_complete(model, "model.vae_path", path)
    return _frozen(model)


# ---------------------------------------------------------------------------------------------
# Tokenizers from ComfyUI's checkout

_CLIP_TOKENIZER = os.path.join("comfy", "sd1_tokenizer")
_T5_TOKENIZER = os.path.join("comfy", "text_encoders", "t5_tokenizer")


def comfyui_candidates(comfyui=None, model_files=()):
    """Where ComfyUI's source may be: the argument (inside ComfyUI, the node layer passes its
    folder), env LORALAB_COMFYUI, the folder above the `models/` folder holding a model file."""
    candidates = [comfyui, os.environ.get("LORALAB_COMFYUI")]
    for path in model_files:
        if not path:
            continue
        parts = os.path.abspath(str(path)).split(os.sep)
        if "models" in parts:
            index = len(parts) - 1 - parts[::-1].index("models")
            candidates.append(os.sep.join(parts[:index]) or os.sep)
    return [c for c in dict.fromkeys(candidates) if c]


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
    return {"clip_l": load_clip, "t5": load_t5, "vae": load_vae}[slot](path, dtype)


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


def folder_transformer_files(folder):
    """The safetensors shard(s) of a diffusers folder's transformer, or None if it has none."""
    sub = os.path.join(folder, "transformer")
    index = os.path.join(sub, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(sub, s) for s in shards]
    single = os.path.join(sub, "diffusion_pytorch_model.safetensors")
    return [single] if os.path.isfile(single) else None
