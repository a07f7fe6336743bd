"""What the tiny random models of several families are built from (tests and tries: nothing can be
downloaded from a model hub): random tensors for files written tensor by tensor, ComfyUI's
"scaled fp8", byte-level BPE tokenizers (CLIP's, Qwen's) with a few whole-word merges, and
FLUX.1's autoencoder, tiny, in BFL's layout."""
import json
import os

import torch

CAPTION_WORDS = ("a photo of the in on with and at by cat dog person man woman red blue green black "
          "white portrait style painting sks ohwx trigger face smiling sitting standing tree "
          "sky house car street light dark background close up wearing shirt hat glasses").split()


def random_init(shape, name):
    """A maker of a random tensor for write_streaming: norms and scales at one, biases zero."""
    if len(shape) == 1 and "bias" not in name and ("norm" in name or name.endswith(".scale")):
        return lambda: torch.ones(shape)
    if len(shape) == 1:
        return lambda: torch.zeros(shape)
    return lambda: torch.randn(shape) * 0.02


def scaled_fp8(weights, block_prefixes):
    """Weights as ComfyUI writes "scaled fp8": the block linear weights (keys starting with one of
    `block_prefixes`) in float8_e4m3fn, each with a float32 `<layer>.scale_weight`, and the
    `scaled_fp8` marker."""
    from . import files, fp8

    scaled = {files.SCALED_FP8_MARKER: torch.empty(0, dtype=fp8.FP8)}
    for key, value in weights.items():
        if key.startswith(block_prefixes) and key.endswith(".weight") and value.dim() == 2:
            scaled[key], scale = fp8.to_fp8(value)
            scaled[key[:-len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            scaled[key] = value
    return scaled


# ---------------------------------------------------------------------------------------------
# Tokenizers


def bytes_to_unicode():
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


def write_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    alphabet = bytes_to_unicode()
    vocab = {}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in CAPTION_WORDS:  # merge a few whole words so common captions tokenize compactly
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


# Qwen3's embedding rows (its config's vocab_size, beyond the tokenizer's 151669 ids): the tiny
# text encoder keeps them so that the real tokenizer (ComfyUI's qwen25_tokenizer) fits it too.
QWEN3_VOCAB = 151936

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_WORDS = ("a photo of the in on with and at by cat dog person man woman red blue green black white "
          "portrait style painting sks ohwx trigger face star circle square user assistant").split()


def write_qwen3_tokenizer(folder, max_length=64):
    """A byte-level BPE Qwen2Tokenizer with a few hundred tokens (Qwen's special tokens, whole-word
    merges for common caption words) and Qwen3's chat template; the real one is 151669 tokens."""
    from transformers import Qwen2Tokenizer

    from .qwen3 import CHAT_TEMPLATE

    vocab = {char: i for i, char in enumerate(bytes_to_unicode())}  # GPT-2's byte-level alphabet, which Qwen's BPE uses
    merges = []
    for word in _QWEN_WORDS:  # "Ġ" is the byte-level space: " photo" merges to one token
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


# ---------------------------------------------------------------------------------------------
# FLUX.1's autoencoder


def tiny_ae(shape):
    """FLUX.1's ae (AutoencoderKL with FLUX.1's shift and scale, no quant convs), tiny; Z-Image
    uses the same ae."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=shape["latent_channels"],
        block_out_channels=shape["vae_channels"], layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(shape["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(shape["vae_channels"]),
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)


def write_bfl_vae(vae_folder, path):
    """A diffusers AutoencoderKL folder as BFL's ae.safetensors (ComfyUI's models/vae)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from .autoencoder import VAE_GROUPS_KEY, vae_to_bfl

    vae = AutoencoderKL.from_pretrained(vae_folder)
    state = vae.state_dict()
    mapping = vae_to_bfl({k: v.shape for k, v in state.items()}, len(vae.config.block_out_channels))
    save_file({b: state[d].reshape(shape).contiguous() for b, (d, shape) in mapping.items()}, path,
              metadata={VAE_GROUPS_KEY: str(vae.config.norm_num_groups)})
    return path
