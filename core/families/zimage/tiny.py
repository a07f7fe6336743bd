"""Tiny random Z-Image pipelines, built locally from diffusers' and transformers' own classes
(ZImageTransformer2DModel, Qwen3Model, FLUX.1's AutoencoderKL), for tests and tries: nothing can
be downloaded from a model hub. The folder has a real Z-Image diffusers folder's layout
(transformer, text_encoder, tokenizer, vae, scheduler), so it loads as Tongyi-MAI/Z-Image does."""
import json
import os

import torch

# Qwen3's embedding rows (its config's vocab_size, beyond the tokenizer's 151669 ids): the tiny
# text encoder keeps them so that the real tokenizer (ComfyUI's qwen25_tokenizer) fits it too.
QWEN3_VOCAB = 151936

PRESETS = {
    # dim = heads x sum(axes_dims); ComfyUI and the FLUX.1 ae have 16 latent channels, and
    # ComfyUI's Z-Image has 2 refiner layers of each kind; at dim 96 diffusers' feed-forward width
    # (int(dim / 3 * 8) = 256) is also ComfyUI's (8/3 dim rounded up to a multiple of 256)
    "tiny": dict(dim=96, heads=3, axes_dims=(8, 12, 12), layers=2, refiner_layers=2, text_dim=32,
                 text_layers=2, vae_channels=(16, 32), latent_channels=16),
}

# Qwen3's chat template, reduced to what a one-message prompt uses: the pipeline formats prompts
# with it (apply_chat_template, enable_thinking=True), which gives ComfyUI's llama_template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_WORDS = ("a photo of the in on with and at by cat dog person man woman red blue green black white "
          "portrait style painting sks ohwx trigger face star circle square user assistant").split()


def write_tokenizer(folder, max_length=64):
    """A byte-level BPE Qwen2Tokenizer with a few hundred tokens (Qwen's special tokens, whole-word
    merges for common caption words) and Qwen3's chat template; the real one is 151669 tokens."""
    from transformers import Qwen2Tokenizer

    from ..flux.tiny import _bytes_to_unicode  # GPT-2's byte-level alphabet, which Qwen's BPE uses

    vocab = {char: i for i, char in enumerate(_bytes_to_unicode())}
    merges = []
    for word in _WORDS:  # "Ġ" is the byte-level space: " photo" merges to one token
        pieces = ["Ġ"] + list(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length,
                               additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_vae(shape):
    """FLUX.1's ae (AutoencoderKL with its shift and scale, no quant convs), tiny."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=shape["latent_channels"],
        block_out_channels=shape["vae_channels"], layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(shape["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(shape["vae_channels"]),
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)


def build_tiny(folder, preset="tiny", seed=0):
    """Write a random Z-Image diffusers folder; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=shape["text_dim"], intermediate_size=shape["text_dim"] * 2,
        num_hidden_layers=shape["text_layers"], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(
        in_channels=shape["latent_channels"], dim=shape["dim"], n_layers=shape["layers"],
        n_refiner_layers=shape["refiner_layers"], n_heads=shape["heads"], n_kv_heads=shape["heads"],
        cap_feat_dim=shape["text_dim"], axes_dims=list(shape["axes_dims"]), axes_lens=[512, 64, 64])
    # Z-Image's scheduler: a static shift of 3 (Tongyi-MAI/Z-Image's scheduler_config.json)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(scheduler=scheduler, vae=tiny_vae(shape), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder
