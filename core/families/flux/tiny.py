"""Tiny random FLUX.1 pipelines, built locally: the tests, the quickstart and the benchmark use
them because nothing can be downloaded from a model hub.

The folder has the layout of a real FLUX.1 diffusers folder (transformer, vae, text_encoder,
tokenizer, text_encoder_2, tokenizer_2, scheduler), so it loads through the same code path as
black-forest-labs/FLUX.1-dev does.
"""
import json
import os

import torch

# Model shapes by preset. "tiny" trains in seconds on a CPU; "small" is FLUX-shaped (same block
# structure, wider) for the benchmark.
PRESETS = {
    "tiny": dict(layers=2, single_layers=2, heads=4, head_dim=16, rope=(4, 6, 6),
                 text_dim=64, clip_dim=64, vae_channels=(16, 32, 32), latent_channels=4),
    "small": dict(layers=4, single_layers=8, heads=8, head_dim=32, rope=(8, 12, 12),
                  text_dim=256, clip_dim=128, vae_channels=(32, 64, 64), latent_channels=16),
}

_WORDS = ("a photo of the in on with and at by cat dog person man woman red blue green black "
          "white portrait style painting sks ohwx trigger face smiling sitting standing tree "
          "sky house car street light dark background close up wearing shirt hat glasses").split()


def _bytes_to_unicode():
    # CLIP's byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _write_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab = {}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in _WORDS:  # merge a few whole words so common captions tokenize compactly
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"),
                              os.path.join(folder, "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -5.0) for word in _WORDS]
    pieces += [(chr(c), -10.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -10.0) for c in range(ord("0"), ord("9") + 1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux(folder, preset="tiny", seed=0):
    """Write a random FLUX.1 diffusers folder of the given preset size; return the folder."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    clip_tokenizer = _write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    t5_tokenizer = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=shape["clip_dim"],
        intermediate_size=shape["clip_dim"] * 2, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=shape["clip_dim"],
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=shape["text_dim"], d_ff=shape["text_dim"] * 2,
        d_kv=16, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=shape["latent_channels"],
        block_out_channels=shape["vae_channels"], layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(shape["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(shape["vae_channels"]),
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=shape["latent_channels"] * 4,
        num_layers=shape["layers"], num_single_layers=shape["single_layers"],
        attention_head_dim=shape["head_dim"], num_attention_heads=shape["heads"],
        joint_attention_dim=shape["text_dim"], pooled_projection_dim=shape["clip_dim"],
        guidance_embeds=True, axes_dims_rope=shape["rope"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                            tokenizer=clip_tokenizer, text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer, transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder


def write_single_file(folder, path):
    """The folder's transformer as one BFL-keyed .safetensors, as ComfyUI keeps FLUX.1 files."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from .keys import transformer_to_bfl

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = transformer.config
    weights = transformer_to_bfl(transformer.state_dict(), config.num_layers, config.num_single_layers)
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    return path
