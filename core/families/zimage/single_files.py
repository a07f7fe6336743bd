"""Z-Image from the single files a ComfyUI user has: the transformer (models/diffusion_models, in
ComfyUI's key layout, bf16, fp8_e4m3fn or scaled fp8), Qwen3-4B (models/text_encoders,
qwen_3_4b.safetensors) and FLUX.1's ae (models/vae). Each part is built empty on the meta device
and filled tensor by tensor, as FLUX.1's files are; config and sizes are read from the file."""
import os
import re


from ..base import ModelError
from ..parts import autoencoder, qwen3
from ..parts.files import SafetensorsFile, count_layers
from ..parts.qwen3 import QWEN_TOKENIZER
from ..parts.streaming import check_complete, comfyui_candidates, empty_model, fill, freeze, model_shapes

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
AXES_METADATA_KEY = "loralab.axes_dims"  # our tiny files' rope axes (the real model's: 32, 48, 48)
LUMINA2_DIM = 2304  # Lumina 2 has Z-Image's key layout at this width (ComfyUI's model_detection)

SLOTS = {  # slot -> (setting, what to give)
    "transformer": ("model.transformer_path", "a Z-Image transformer (ComfyUI's models/diffusion_models/"
                                              "z_image_bf16.safetensors or z_image_turbo_bf16.safetensors)"),
    "text_encoder": ("model.text_encoder_path", "Qwen3-4B (ComfyUI's models/text_encoders/qwen_3_4b.safetensors)"),
}


def transformer_prefix(names):
    """The prefix of a Z-Image transformer's keys in ComfyUI's layout ("" when bare), or None.
    The keys ComfyUI's model_detection looks for (cap_embedder, the refiner's k_norm)."""
    for prefix in PREFIXES:
        if prefix + "cap_embedder.1.weight" in names and prefix + "noise_refiner.0.attention.k_norm.weight" in names:
            return prefix
    return None


def describe_transformer(tensors):
    """Words for a transformer in Z-Image's layout (ModelFamily.describe_file), None for another file."""
    prefix = transformer_prefix(tensors)
    if prefix is None:
        return None
    dim = tensors[prefix + "cap_embedder.1.weight"]["shape"][0]
    if dim == LUMINA2_DIM:
        return "a Lumina 2 transformer"
    extra = " Omni" if prefix + "siglip_embedder.0.weight" in tensors else ""
    return f"a Z-Image{extra} transformer ({dim} wide)"


def describe(path):
    """What a file looks like, in words (every family's files; core/families/__init__.py)."""
    from .. import describe_file

    return describe_file(path)


def check_file(slot, path):
    """The absolute path, after checking that the file is the part `slot` needs."""
    setting, wanted = SLOTS[slot]
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ModelError(f"{setting}: file not found: {path}. Give {wanted}.")
    found = describe(path)
    expected = "a Z-Image transformer" if slot == "transformer" else "a Qwen3 text encoder"
    if not found.startswith(expected):
        raise ModelError(f"{setting}: {path} looks like {found}, not {wanted}. Give {wanted} in {setting}.")
    return path


def is_zimage_transformer(path):
    return describe(path).startswith("a Z-Image transformer")


# ---------------------------------------------------------------------------------------------
# The transformer


def _axes(head_dim, metadata):
    """Rope axes: our files say; else Z-Image's proportions (32, 48, 48 of 128)."""
    if metadata.get(AXES_METADATA_KEY):
        return [int(a) for a in metadata[AXES_METADATA_KEY].split(",")]
    side = head_dim * 3 // 8 // 2 * 2
    return [head_dim - 2 * side, side, side]


def transformer_config(tensors, metadata, prefix):
    """ZImageTransformer2DModel's config from a ComfyUI-layout header (ComfyUI's model_detection
    reads the same keys; rope theta 256 and axes lengths 1536/512/512 are its Z-Image values)."""
    shape = lambda key: tensors[prefix + key]["shape"]  # noqa: E731
    dim, cap_feat_dim = shape("cap_embedder.1.weight")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    kv_heads = (shape("layers.0.attention.qkv.weight")[0] - dim) // (2 * head_dim)
    return {"in_channels": shape("x_embedder.weight")[1] // 4, "dim": dim, "n_heads": dim // head_dim,
            "n_kv_heads": kv_heads, "cap_feat_dim": cap_feat_dim,
            "n_layers": count_layers(tensors, re.escape(prefix) + r"layers\.(\d+)\."),
            "n_refiner_layers": count_layers(tensors, re.escape(prefix) + r"noise_refiner\.(\d+)\."),
            "axes_dims": _axes(head_dim, metadata), "axes_lens": [1536, 512, 512], "rope_theta": 256.0}


def comfy_to_diffusers(key, config):
    """[(diffusers name, rows)] that one ComfyUI key fills: the inverse of comfy/utils.py
    z_image_to_diffusers (q, k and v are row slices of the fused qkv; `out` is to_out.0)."""
    block = re.match(r"((?:layers|noise_refiner|context_refiner)\.\d+\.)(.*)", key)
    if block:
        head, rest = block.groups()
        if rest.startswith("attention.qkv."):
            suffix = rest[len("attention.qkv."):]
            kv = config["n_kv_heads"] * config["dim"] // config["n_heads"]
            return [(f"{head}attention.{p}.{suffix}", rows)
                    for p, rows in (("to_q", config["dim"]), ("to_k", kv), ("to_v", kv))]
        rest = (rest.replace("attention.out.", "attention.to_out.0.").replace("attention.q_norm.", "attention.norm_q.")
                .replace("attention.k_norm.", "attention.norm_k."))
        return [(head + rest, None)]
    for comfy, diffusers in (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1.")):
        if key.startswith(comfy):
            return [(diffusers + key[len(comfy):], None)]
    return [(key, None)]


def load_transformer(path, dtype):
    from diffusers import ZImageTransformer2DModel

    path = check_file("transformer", path)
    with SafetensorsFile(path) as source:
        prefix = transformer_prefix(source.tensors)
        config = transformer_config(source.tensors, source.metadata, prefix)
        model = empty_model(lambda: ZImageTransformer2DModel(**config))
        shapes = model_shapes(model)
        plan = []
        for key in source.keys():
            if key.startswith(prefix):
                targets = comfy_to_diffusers(key[len(prefix):], config)
                if all(name in shapes for name, _ in targets):
                    plan.append((key, targets, False))
        fill(model, source, plan, dtype, "model.transformer_path")
    check_complete(model, "model.transformer_path", path)
    return freeze(model)


# ---------------------------------------------------------------------------------------------
# The text encoder and tokenizer


def load_text_encoder(path, dtype):
    """transformers' Qwen3Model from ComfyUI's file (Qwen3-4B: 36 layers, 2560 wide)."""
    return qwen3.load_text_encoder(check_file("text_encoder", path), dtype)


def load_tokenizer(comfyui=None, model_files=()):
    """Qwen's tokenizer from ComfyUI's source (comfy/text_encoders/qwen25_tokenizer, the same
    vocabulary and special tokens as Qwen3's; its chat template is not used, see PROMPT_TEMPLATE)."""
    from transformers import Qwen2Tokenizer

    candidates = comfyui_candidates(comfyui, model_files)
    for base in candidates:
        folder = os.path.join(base, QWEN_TOKENIZER)
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            return Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)
    raise ModelError(f"Qwen's tokenizer was not found: it comes with ComfyUI's source ({QWEN_TOKENIZER}). Set "
                     "the environment variable LORALAB_COMFYUI to ComfyUI's folder, keep the model files in "
                     "ComfyUI's models/ folder, or give model.path a Z-Image diffusers folder (its tokenizer/). "
                     "Looked in: " + (", ".join(candidates) or "nowhere (no hint given)"))


def scheduler():
    """Z-Image's flow-matching scheduler: a static shift of 3 (ComfyUI's ZImage sampling_settings,
    Tongyi-MAI/Z-Image's scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def load_parts(model, dtype):
    """{pipeline part: module} of the single files the model section gives."""
    parts = {}
    if model.get("transformer_path"):
        parts["transformer"] = load_transformer(model["transformer_path"], dtype)
    if model.get("text_encoder_path"):
        parts["text_encoder"] = load_text_encoder(model["text_encoder_path"], dtype)
    if model.get("vae_path"):
        parts["vae"] = autoencoder.load(model["vae_path"], dtype)  # FLUX.1's ae
    return parts


def check_widths(pipeline, model):
    """The text encoder's width must be what the transformer reads (Qwen3-4B: 2560)."""
    width, wanted = pipeline.text_encoder.config.hidden_size, pipeline.transformer.config.cap_feat_dim
    if width != wanted:
        raise ModelError(f"model.text_encoder_path: the text encoder is {width} wide, but the transformer "
                         f"({model.get('transformer_path') or model.get('path')}) reads {wanted}-wide text: "
                         "give the text encoder this transformer was trained with (Z-Image: Qwen3-4B).")
