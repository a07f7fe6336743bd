"""Qwen-Image's text: the Qwen2.5-VL tokenizer (from ComfyUI's source) and the prompt embeddings
as the cache keeps them (padded to one length, with their mask)."""
import os

import torch

from ..parts.streaming import comfyui_candidates
from ..base import ModelError

TOKENIZER = os.path.join("comfy", "text_encoders", "qwen25_tokenizer")
# QwenImagePipeline.__call__'s max_sequence_length: captions are cut there, and padded to it so
# the cache's embeddings stack into batches; the loss cuts the batch back to its longest caption
TEXT_LENGTH = 512


def find_tokenizer(comfyui=None, model_files=()):
    """ComfyUI's qwen25_tokenizer folder (the real Qwen2.5-VL vocabulary and merges)."""
    candidates = comfyui_candidates(comfyui, model_files)
    for base in candidates:
        if os.path.isfile(os.path.join(base, TOKENIZER, "vocab.json")):
            return os.path.join(base, TOKENIZER)
    raise ModelError(
        f"The Qwen2.5-VL tokenizer was not found: it comes with ComfyUI's source ({TOKENIZER}). "
        "Set the environment variable LORALAB_COMFYUI to ComfyUI's folder, or keep the model files "
        "in ComfyUI's models/ folder. Looked in: " + (", ".join(candidates) or "nowhere (no hint given)"))


def padded(embeds, mask):
    """(embeddings [TEXT_LENGTH, dim], mask [TEXT_LENGTH]) of one prompt's [1, n, dim] embeddings
    and mask (None: every token counts), zeros past the prompt."""
    length = embeds.shape[1]
    out = embeds.new_zeros(TEXT_LENGTH, embeds.shape[2])
    out[:length] = embeds[0]
    keep = torch.zeros(TEXT_LENGTH)
    keep[:length] = 1.0 if mask is None else mask[0].float()
    return out, keep


def trimmed(text, mask):
    """A batch cut back to its longest caption; mask None where every token counts (as
    QwenImagePipeline.encode_prompt gives it)."""
    length = max(1, int(mask.sum(dim=1).max().item()))
    text, mask = text[:, :length], mask[:, :length]
    return text, (None if bool((mask > 0).all()) else mask)
