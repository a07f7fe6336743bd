"""The untrained shapes model: a FLUX-shaped diffusers folder built by tiny.py at the "shapes"
preset, with the scene words as whole tokens and a T5 whose attention favours neighbours."""
import contextlib

import torch

from ...parts import tiny as parts_tiny
from .. import tiny
from .scenes import PALETTE, SHAPES

# The prototype scale: hidden 192 (6 heads of 32), 2 double and 4 single blocks.
SHAPES_PRESET = dict(layers=2, single_layers=4, heads=6, head_dim=32, rope=(8, 12, 12),
                     text_dim=64, clip_dim=64, vae_channels=(16, 32, 32), latent_channels=4)
SCENE_WORDS = tuple(PALETTE) + SHAPES + ("magenta", "star", "five", "pointed")


@contextlib.contextmanager
def _scene_words():
    # the tiny tokenizers make their word list whole tokens (the CLIP one in parts/tiny.py, the T5
    # one in tiny.py); the colours and shapes are added for this build only, so "yellow" is one
    # token, not six letters.
    words = parts_tiny.CAPTION_WORDS
    scene = tuple(words) + tuple(w for w in SCENE_WORDS if w not in words)
    parts_tiny.CAPTION_WORDS = tiny.CAPTION_WORDS = scene
    try:
        yield
    finally:
        parts_tiny.CAPTION_WORDS = tiny.CAPTION_WORDS = words


def _local_t5_attention(t5):
    """T5's text tokens reach the transformer without positions, so "a red circle on a blue
    background" and "a blue circle on a red background" would be the same bag of tokens. A
    relative-position bias falling with distance (one slope per head) mixes each word with its
    neighbours, so the shape's colour and the background's differ."""
    bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    buckets, heads = bias.shape
    half, exact = buckets // 2, buckets // 4  # bidirectional buckets; the first `exact` are distances
    distance = torch.full((buckets,), float(exact * 2))
    distance[:exact] = torch.arange(exact, dtype=torch.float32)
    distance[half:half + exact] = torch.arange(exact, dtype=torch.float32)
    slopes = torch.tensor([0.5 * 2 ** h for h in range(heads)])
    with torch.no_grad():
        bias.copy_(-distance[:, None] * slopes[None, :])


def build_base(folder, seed=0):
    """Write the random shapes model to `folder` (T5 with local attention); return the folder."""
    from transformers import T5EncoderModel

    tiny.PRESETS.setdefault("shapes", SHAPES_PRESET)
    with _scene_words():
        tiny.build_tiny_flux(folder, "shapes", seed)
    t5_folder = f"{folder}/text_encoder_2"
    t5 = T5EncoderModel.from_pretrained(t5_folder)
    _local_t5_attention(t5)
    t5.save_pretrained(t5_folder)
    return folder
