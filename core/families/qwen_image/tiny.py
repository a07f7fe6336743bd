"""Tiny random Qwen-Image pipelines, built locally from diffusers' and transformers' own classes
(nothing can be downloaded from a model hub): a QwenImagePipeline folder with the layout of
Qwen/Qwen-Image (transformer, vae, text_encoder, tokenizer, scheduler), so it loads through the
same code as the real one. The tokenizer is the real one, from ComfyUI's source."""
import os

import torch

from .text import find_tokenizer

# hidden 32, two blocks: each test trains in seconds on a CPU
PRESET = dict(layers=2, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32, text_layers=2,
              vae_base=8, vocab=151936)  # vocab: Qwen2.5's padded embedding rows (the tokenizer's ids fit)

# Qwen/Qwen-Image's scheduler_config.json: the shift grows with the image's token count
# (mu from 0.5 at 256 tokens to 0.9 at 8192, exponential time shift)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                 time_shift_type="exponential", use_dynamic_shifting=True)


def mrope_section(head_dim):
    """Qwen2.5-VL's rope sections (time, height, width) of half a head: 7B's [16, 24, 24] at 128,
    in the same proportions for narrower heads."""
    half = head_dim // 2
    side = half * 3 // 8
    return [half - 2 * side, side, side]


def text_encoder_config(hidden, layers, heads, vocab):
    """A Qwen2.5-VL config of the given text width; its vision tower as small as it goes (Qwen-Image
    reads text only, the edit models images too)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": mrope_section(hidden // heads)}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[0]),
        tie_word_embeddings=True)


def build_tiny_qwen_image(folder, comfyui=None, seed=0):
    """Write a random QwenImagePipeline folder of PRESET's size; return the folder."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    shape = PRESET
    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(find_tokenizer(comfyui), local_files_only=True)
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_encoder_config(
        shape["text_dim"], shape["text_layers"], 2, shape["vocab"]))
    # the real VAE's structure (4 levels, 2 resnets each, 8x spatial), 12x narrower
    vae = AutoencoderKLQwenImage(base_dim=shape["vae_base"], z_dim=16, dim_mult=[1, 2, 4, 4],
                                 num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=shape["layers"],
        attention_head_dim=shape["head_dim"], num_attention_heads=shape["heads"],
        joint_attention_dim=shape["text_dim"], axes_dims_rope=shape["rope"])
    pipeline = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                 text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    os.makedirs(folder, exist_ok=True)
    pipeline.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The same tiny model as ComfyUI's files (models/diffusion_models, text_encoders, vae)


def write_comfyui_files(folder):
    """The folder's model as ComfyUI's files in FOLDER/comfyui/: {"transformer" (bf16),
    "transformer_fp8" (fp8_e4m3fn block weights), "transformer_scaled_fp8" (ComfyUI's scaled
    fp8), "text_encoder" (Qwen2.5-VL's original names, no lm_head), "vae" (Wan 2.1's layout)}."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..parts import fp8
    from ..parts.files import SCALED_FP8_MARKER
    from . import files

    out = os.path.join(folder, "comfyui")
    paths = {"transformer": "diffusion_models/qwen_image_tiny_bf16.safetensors",
             "transformer_fp8": "diffusion_models/qwen_image_tiny_fp8_e4m3fn.safetensors",
             "transformer_scaled_fp8": "diffusion_models/qwen_image_tiny_fp8_scaled.safetensors",
             "text_encoder": "text_encoders/qwen_2.5_vl_tiny.safetensors",
             "vae": "vae/qwen_image_vae_tiny.safetensors"}
    paths = {k: os.path.join(out, v) for k, v in paths.items()}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    transformer = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in transformer.state_dict().items()}
    save_file(weights, paths["transformer"])
    plain, scaled = {}, {SCALED_FP8_MARKER: torch.empty(0, dtype=fp8.FP8)}
    for key, value in weights.items():
        if fp8.is_block_linear(key) and key.endswith(".weight") and value.dim() == 2:
            plain[key] = value.to(fp8.FP8)
            scaled[key], scale = fp8.to_fp8(value)
            scaled[key[:-len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            plain[key] = scaled[key] = value
    save_file(plain, paths["transformer_fp8"])
    save_file(scaled, paths["transformer_scaled_fp8"])

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(folder, "text_encoder"))
    original = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("model.language_model."):
            original["model." + key[len("model.language_model."):]] = value.contiguous()
        elif key.startswith("model.visual."):
            original[key[len("model."):]] = value.contiguous()
    config = encoder.config
    save_file(original, paths["text_encoder"], metadata={
        files.HEAD_DIM_KEY: str(config.text_config.hidden_size // config.text_config.num_attention_heads),
        files.VISION_HEADS_KEY: str(config.vision_config.num_heads)})

    vae = AutoencoderKLQwenImage.from_pretrained(os.path.join(folder, "vae"))
    state = vae.state_dict()
    save_file({wan: state[ours].contiguous() for ours, wan in files.wan_names(state).items()},
              paths["vae"])
    return paths


def write_real_width_files(folder, seed=0, parts=("transformer", "text_encoder", "vae")):
    """Qwen-Image-width files in ComfyUI's layout for benchmarks/load_memory.py, random, written
    tensor by tensor: a transformer of width 3072 (24 heads of 128) with one block, a Qwen2.5-VL
    7B text encoder with one language layer and one vision block, and the real Qwen-Image VAE."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from ..parts.files import write_streaming
    from ..parts.tiny import random_init
    from . import files

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    paths = {"transformer": os.path.join(folder, "qwen_image_1_block_bf16.safetensors"),
             "text_encoder": os.path.join(folder, "qwen_2.5_vl_7b_1_layer.safetensors"),
             "vae": os.path.join(folder, "qwen_image_vae.safetensors")}
    with init_empty_weights():
        transformer = QwenImageTransformer2DModel(num_layers=1)
        vae = AutoencoderKLQwenImage()
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
                             num_attention_heads=28, num_key_value_heads=4,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)))
    bf16 = torch.bfloat16
    paths = {k: v for k, v in paths.items() if k in parts}
    if "transformer" in paths:
        shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
        write_streaming(paths["transformer"], [(k, s, bf16, random_init(s, k)) for k, s in shapes.items()])
    if "text_encoder" in paths:
        _write_text_encoder(paths["text_encoder"], encoder)
    if "vae" in paths:
        vae_shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        write_streaming(paths["vae"], [(wan, vae_shapes[ours], bf16, random_init(vae_shapes[ours], wan))
                                       for ours, wan in files.wan_names(vae_shapes).items()])
    return paths


def _write_text_encoder(path, encoder):
    from ..parts.files import write_streaming
    from ..parts.tiny import random_init

    shapes = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("model.language_model."):
            shapes["model." + key[len("model.language_model."):]] = tuple(value.shape)
        elif key.startswith("model.visual."):
            shapes[key[len("model."):]] = tuple(value.shape)
    write_streaming(path, [(k, s, torch.bfloat16, random_init(s, k)) for k, s in shapes.items()])
