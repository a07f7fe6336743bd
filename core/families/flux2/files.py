"""FLUX.2 klein from the single files a ComfyUI user has: the transformer (models/diffusion_models,
flux-2-klein-base-4b.safetensors and the like: BFL's original names, as ComfyUI loads and saves
them; bf16, fp8_e4m3fn or scaled fp8), Qwen3 (models/text_encoders: qwen_3_4b.safetensors for
klein 4B, qwen_3_8b for 9B) and the FLUX.2 VAE (models/vae/flux2-vae.safetensors). Each part is
built empty on the meta device and filled tensor by tensor, as FLUX.1's files are; the config,
the variant and the block counts are read from the file.

BFL's names -> diffusers' are ours: ComfyUI has no names for FLUX.2's global modulations and
cannot convert diffusers' FLUX.2 either way. The facts are diffusers' (its single-file
convert_flux2_transformer_checkpoint_to_diffusers and scripts/convert_flux2_to_diffusers.py):
the double blocks' fused qkv splits into three equal q, k, v; the single blocks' fused linear1
stays fused (to_qkv_mlp_proj); the final layer's (shift, scale) is diffusers' (scale, shift)."""
import json
import os
import re

import torch

from ..base import ModelError
from ..parts import qwen3
from ..parts.autoencoder import VAE_GROUPS_KEY
from ..parts.files import AXES_METADATA_KEY, SafetensorsFile, checked_file, count_layers, is_scale_key, read_header
from ..parts.qwen3 import QWEN_TOKENIZER, qwen3_prefix  # klein's text encoder is Z-Image's Qwen3
from ..parts.streaming import (check_complete, comfyui_candidates, empty_model, fill, freeze, model_shapes,
                               swap_halves)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")
MARKER = "double_stream_modulation_img.lin.weight"  # what ComfyUI's model_detection reads as FLUX.2
# Qwen3 width -> the klein it conditions (the transformer reads 3 stacked hidden states)
VARIANTS = {2560: "klein 4B", 4096: "klein 9B"}
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # ComfyUI's quantized layers we can undo

TOP_LEVEL = {  # BFL module -> diffusers module (renamed only)
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
}
DOUBLE_BLOCK = {  # inside double_blocks.N -> transformer_blocks.N (qkv: three equal row slices)
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.proj": ("attn.to_add_out",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",),
}
SINGLE_BLOCK = {  # inside single_blocks.N -> single_transformer_blocks.N
    "linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",),
}
SWAPPED = ("final_layer.adaLN_modulation.1",)

SLOTS = {  # kind -> (setting, what to give)
    "flux2_transformer": ("model.transformer_path", "a FLUX.2 klein transformer (ComfyUI's models/diffusion_models/"
                                                    "flux-2-klein-base-4b.safetensors, -base-9b, or their fp8 files)"),
    "qwen3": ("model.text_encoder_path", "the Qwen3 text encoder (ComfyUI's models/text_encoders/qwen_3_4b.safetensors "
                                         "for klein 4B, qwen_3_8b.safetensors for klein 9B, or their fp8 files)"),
    "flux2_vae": ("model.vae_path", "the FLUX.2 VAE (ComfyUI's models/vae/flux2-vae.safetensors)"),
}


# ---------------------------------------------------------------------------------------------
# What a file is


def transformer_prefix(names):
    """The prefix of a FLUX.2 transformer's BFL keys ("" when bare), or None when not one."""
    for prefix in PREFIXES:
        if prefix + MARKER in names and prefix + "img_in.weight" in names:
            return prefix
    return None


def is_flux2_vae(names):
    """BFL's / ComfyUI's FLUX.2 VAE: the LDM layout with a batch norm over the patchified latent
    (what comfy/sd.py reads as batch_norm_latent)."""
    return "bn.running_mean" in names and "encoder.down.0.block.0.conv1.weight" in names \
        and "decoder.conv_in.weight" in names


def kind(tensors):
    """"flux2_transformer", "qwen3", "flux2_vae" or None, from a header's names."""
    if transformer_prefix(tensors) is not None:
        return "flux2_transformer"
    if qwen3_prefix(tensors) is not None:
        return "qwen3"
    if is_flux2_vae(tensors):
        return "flux2_vae"
    return None


def variant(text_width):
    return VARIANTS.get(text_width, f"reading {text_width}-wide text")


def describe_part(tensors):
    """Words for a FLUX.2 transformer or VAE (ModelFamily.describe_file), None for another file."""
    prefix = transformer_prefix(tensors)
    if prefix is not None:
        text_width = tensors[prefix + "txt_in.weight"]["shape"][1] // 3
        name = "dev" if prefix + "guidance_in.in_layer.weight" in tensors else variant(text_width)
        blocks = (count_layers(tensors, re.escape(prefix) + r"double_blocks\.(\d+)\."),
                  count_layers(tensors, re.escape(prefix) + r"single_blocks\.(\d+)\."))
        return f"a FLUX.2 transformer ({name}, {blocks[0]} double and {blocks[1]} single blocks)"
    if is_flux2_vae(tensors):
        return f"the FLUX.2 VAE ({tensors['decoder.conv_in.weight']['shape'][1]} latent channels)"
    return None


def describe(path):
    """What a file looks like, in words (every family's files; core/families/__init__.py)."""
    from .. import describe_file

    return describe_file(path)


def _quantized_formats(source):
    """ComfyUI's per-layer quantization formats in a file (its `<layer>.comfy_quant` tensors or
    the `_quantization_metadata` of newer files; old scaled fp8 is float8_e4m3fn)."""
    formats = set()
    if source.metadata.get("_quantization_metadata"):
        try:
            layers = json.loads(source.metadata["_quantization_metadata"]).get("layers", {})
            formats |= {str(conf.get("format")) for conf in layers.values()}
        except (ValueError, AttributeError):
            formats.add("unreadable")
    with source:
        for key in source.keys():
            if key.endswith(".comfy_quant"):
                try:
                    formats.add(str(json.loads(bytes(source.raw(key).tolist())).get("format")))
                except (ValueError, AttributeError):
                    formats.add("unreadable")
    return formats


def check_file(expected, path):
    """The file's absolute path, after checking it exists, is the part `expected` and holds no
    layers in a quantized format that cannot be undone here (nvfp4, mxfp8, int8...)."""
    setting, wanted = SLOTS[expected]
    path = checked_file(path, setting, wanted, lambda tensors: kind(tensors) == expected, describe)
    other = _quantized_formats(SafetensorsFile(path)) - set(FP8_FORMATS)
    if other:
        raise ModelError(f"{setting}: {path} has layers quantized as {', '.join(sorted(other))}, which LoRA Lab "
                         "does not read; give the bf16 or fp8 file of this model.")
    return path


def claims(model):
    """Whether a model section's files are FLUX.2's (model.family auto): its transformer file, or
    without one its VAE file (a Qwen3 file alone could as well be Z-Image's)."""
    for key, wanted in (("transformer_path", "flux2_transformer"), ("vae_path", "flux2_vae")):
        path = os.path.expanduser(model.get(key) or "")
        if path and os.path.isfile(path):
            try:
                return kind(read_header(path)[0]) == wanted
            except (OSError, ValueError):
                return False
    return False


# ---------------------------------------------------------------------------------------------
# The transformer


def _axes(head_dim, metadata):
    """Rope axes: FLUX.2's four of 32 at head_dim 128; our narrower files say theirs."""
    if metadata.get(AXES_METADATA_KEY):
        axes = [int(a) for a in json.loads(metadata[AXES_METADATA_KEY])]
        if sum(axes) == head_dim:
            return axes
    return [head_dim // 4] * 4


def transformer_config(tensors, metadata, prefix):
    """Flux2Transformer2DModel's config from a BFL-layout header (the keys ComfyUI's
    model_detection reads, plus the widths it assumes: FLUX.2's rope theta 2000)."""
    shape = lambda key: tensors[prefix + key]["shape"]  # noqa: E731
    inner, in_channels = shape("img_in.weight")
    head_dim = tensors.get(prefix + "double_blocks.0.img_attn.norm.query_norm.scale",
                           tensors.get(prefix + "double_blocks.0.img_attn.norm.query_norm.weight"))["shape"][0]
    config = {"patch_size": 1, "in_channels": in_channels, "out_channels": shape("final_layer.linear.weight")[0],
              "num_layers": count_layers(tensors, re.escape(prefix) + r"double_blocks\.(\d+)\."),
              "num_single_layers": count_layers(tensors, re.escape(prefix) + r"single_blocks\.(\d+)\."),
              "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
              "joint_attention_dim": shape("txt_in.weight")[1],
              "timestep_guidance_channels": shape("time_in.in_layer.weight")[1],
              "mlp_ratio": shape("double_blocks.0.img_mlp.2.weight")[1] / inner,
              "axes_dims_rope": _axes(head_dim, metadata),
              "guidance_embeds": prefix + "guidance_in.in_layer.weight" in tensors}
    return config


def diffusers_modules(bfl_module):
    """The diffusers modules one BFL module (no prefix) fills, in row order; None if unknown."""
    if bfl_module in TOP_LEVEL:
        return (TOP_LEVEL[bfl_module],)
    block = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", bfl_module)
    if block:
        kind_, index, inner = block.groups()
        table, head = (DOUBLE_BLOCK, "transformer_blocks") if kind_ == "double" else (SINGLE_BLOCK, "single_transformer_blocks")
        if inner in table:
            return tuple(f"{head}.{index}.{name}" for name in table[inner])
    return None


def transformer_plan(keys, prefix, shapes):
    """fill's plan [(file key, [(diffusers name, rows)], swap halves)] of a BFL-layout file. A q/k
    norm's `.scale` (BFL) and `.weight` (as ComfyUI saves it) are both diffusers' `.weight`."""
    plan = []
    for key in keys:
        if not key.startswith(prefix) or is_scale_key(key):
            continue
        module, _, suffix = key[len(prefix):].rpartition(".")
        targets = diffusers_modules(module)
        if not targets:
            continue
        suffix = "weight" if suffix == "scale" else suffix
        names = [f"{target}.{suffix}" for target in targets]
        if all(name in shapes for name in names):
            plan.append((key, [(name, shapes[name][0]) for name in names], module in SWAPPED))
    return plan


def load_transformer(path, dtype):
    """Flux2Transformer2DModel from ComfyUI's file (bf16, fp8_e4m3fn or scaled fp8; fp8 weights
    dequantised to `dtype`)."""
    from diffusers import Flux2Transformer2DModel

    path = check_file("flux2_transformer", path)
    with SafetensorsFile(path) as source:
        prefix = transformer_prefix(source.tensors)
        config = transformer_config(source.tensors, source.metadata, prefix)
        model = empty_model(lambda: Flux2Transformer2DModel(**config))
        fill(model, source, transformer_plan(source.keys(), prefix, model_shapes(model)), dtype, "model.transformer_path")
    check_complete(model, "model.transformer_path", path)
    return freeze(model)


def to_comfyui_layout(weights):
    """A Flux2Transformer2DModel state dict in BFL's names, as ComfyUI's files have them (q/k
    norms as `.scale`, BFL's original; ComfyUI reads them either way): the inverse of the plan."""
    fused = {}  # first diffusers module -> (BFL module, every diffusers module it fuses)
    for bfl, ours in TOP_LEVEL.items():
        fused[ours] = (bfl, (ours,))
    blocks = {m.group(0) for m in map(re.compile(r"(single_)?transformer_blocks\.\d+\.").match, weights) if m}
    for head in blocks:
        index = head.split(".")[1]
        table, bfl_head = (SINGLE_BLOCK, "single_blocks") if head.startswith("single") else (DOUBLE_BLOCK, "double_blocks")
        for bfl, names in table.items():
            fused[head + names[0]] = (f"{bfl_head}.{index}.{bfl}", tuple(head + n for n in names))
    out, used = {}, set()
    for key in weights:
        module, _, suffix = key.rpartition(".")
        if module not in fused:
            continue
        bfl, parts = fused[module]
        names = [f"{part}.{suffix}" for part in parts]
        value = torch.cat([weights[name] for name in names])
        out[f"{bfl}.{'scale' if bfl.endswith('_norm') else suffix}"] = swap_halves(value) if bfl in SWAPPED else value
        used.update(names)
    if set(weights) - used:
        raise ValueError(f"no BFL name for {sorted(set(weights) - used)[:3]}")
    return out


# ---------------------------------------------------------------------------------------------
# The text encoder, tokenizer and VAE


def load_text_encoder(path, dtype):
    """transformers' Qwen3Model from ComfyUI's file (bf16 or fp8), its config read from the
    shapes (Qwen3-4B: 36 layers, 2560 wide; Qwen3-8B: 36 layers, 4096 wide)."""
    return qwen3.load_text_encoder(check_file("qwen3", path), dtype)


def load_tokenizer(comfyui=None, model_files=()):
    """Qwen's tokenizer from ComfyUI's source (comfy/text_encoders/qwen25_tokenizer, Qwen3's
    vocabulary), with Qwen3's chat template: ComfyUI's files carry Qwen2.5's, which adds a system
    message that klein never saw (ComfyUI's KleinTokenizer writes the same one-message prompt)."""
    from transformers import Qwen2Tokenizer

    candidates = comfyui_candidates(comfyui, model_files)
    for base in candidates:
        folder = os.path.join(base, QWEN_TOKENIZER)
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            tokenizer = Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)
            tokenizer.chat_template = qwen3.CHAT_TEMPLATE
            return tokenizer
    raise ModelError(f"Qwen's tokenizer was not found: it comes with ComfyUI's source ({QWEN_TOKENIZER}). Set "
                     "the environment variable LORALAB_COMFYUI to ComfyUI's folder, keep the model files in "
                     "ComfyUI's models/ folder, or give model.path a FLUX.2 klein diffusers folder (its tokenizer/). "
                     "Looked in: " + (", ".join(candidates) or "nowhere (no hint given)"))


def vae_config(tensors, metadata):
    """AutoencoderKLFlux2's config from the file's shapes (FLUX.2's: 128, 256, 512, 512 wide, two
    resnets a level, 32 latent channels, quant convs)."""
    levels = count_layers(tensors, r"encoder\.down\.(\d+)\.")
    channels = [tensors[f"encoder.down.{i}.block.0.conv2.weight"]["shape"][0] for i in range(levels)]
    decoder = [tensors[f"decoder.up.{i}.block.0.conv2.weight"]["shape"][0] for i in range(levels)]
    return {"in_channels": tensors["encoder.conv_in.weight"]["shape"][1],
            "out_channels": tensors["decoder.conv_out.weight"]["shape"][0],
            "latent_channels": tensors["decoder.conv_in.weight"]["shape"][1],
            "block_out_channels": channels, "decoder_block_out_channels": decoder if decoder != channels else None,
            "layers_per_block": count_layers(tensors, r"encoder\.down\.0\.block\.(\d+)\."),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "norm_num_groups": int(metadata.get(VAE_GROUPS_KEY, 32)),
            "use_quant_conv": any(k in tensors for k in ("quant_conv.weight", "encoder.quant_conv.weight")),
            "use_post_quant_conv": any(k in tensors for k in ("post_quant_conv.weight", "decoder.post_quant_conv.weight"))}


# BFL keeps the quant convs inside the encoder and decoder; ComfyUI (comfy/sd.py) moves them out
_QUANT_CONVS = (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv."))


def load_vae(path, dtype):
    """AutoencoderKLFlux2 from BFL's / ComfyUI's FLUX.2 VAE. It is small (84M parameters), so its
    weights are converted in one state dict by diffusers' LDM VAE converter; the batch norm's
    running statistics are carried over as they are."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = check_file("flux2_vae", path)
    with SafetensorsFile(path) as source:
        config = vae_config(source.tensors, source.metadata)
        weights = {}
        for key in source.keys():
            if is_scale_key(key):
                continue
            name = key
            for bfl, ours in _QUANT_CONVS:
                name = ours + name[len(bfl):] if name.startswith(bfl) else name
            weights[name] = source.get(key, dtype if not key.startswith("bn.") else torch.float32)
    model = empty_model(lambda: AutoencoderKLFlux2(**config))
    converted = convert_ldm_vae_checkpoint(weights, config)
    converted.update({k: v for k, v in weights.items() if k.startswith("bn.")})
    del weights
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"model.vae_path: {path} does not fit the FLUX.2 VAE (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.bn.to(dtype)
    check_complete(model, "model.vae_path", path)
    return freeze(model)


def to_bfl_vae(weights, levels):
    """An AutoencoderKLFlux2 state dict in BFL's layout (FLUX.1's ae names, the quant convs inside
    the encoder and decoder, the batch norm's statistics), as flux2-vae.safetensors has it."""
    from ..parts.autoencoder import vae_to_bfl

    shapes = {k: tuple(v.shape) for k, v in weights.items() if not k.startswith("bn.")}
    out = {}
    for bfl, (ours, shape) in vae_to_bfl(shapes, levels).items():
        for theirs, name in _QUANT_CONVS:
            bfl = theirs + bfl[len(name):] if bfl.startswith(name) else bfl
        out[bfl] = weights[ours].reshape(shape)
    out.update({k: v for k, v in weights.items() if k in ("bn.running_mean", "bn.running_var")})
    return out


def check_widths(pipeline, model):
    """The text encoder's width must be what the transformer reads (3 stacked hidden states)."""
    width, wanted = pipeline.text_encoder.config.hidden_size, pipeline.transformer.config.joint_attention_dim // 3
    if width != wanted:
        raise ModelError(f"model.text_encoder_path: the text encoder is {width} wide ({variant(width)}), but the "
                         f"transformer ({model.get('transformer_path') or model.get('path')}) is {variant(wanted)}: "
                         "give the text encoder it was trained with (klein 4B: qwen_3_4b.safetensors; "
                         "klein 9B: qwen_3_8b.safetensors).")
