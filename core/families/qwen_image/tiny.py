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


def text_encoder_config(hidden, layers, heads, vocab):
    """A Qwen2.5-VL config of the given text width; its vision tower as small as it goes (Qwen-Image
    reads text only, the edit models images too). mrope's sections split the half head as 7B's
    [16, 24, 24] splits 64."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // heads
    half = head_dim // 2
    side = (half * 3 // 8)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [half - 2 * side, side, side]}),
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
