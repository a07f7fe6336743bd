"""Preservation against bleed (train.preservation_class; ai-toolkit calls it differential output
preservation). On entries whose caption holds the trigger word, the same noisy input is also
predicted for the caption with the trigger replaced by the class word ("a photo of sks" ->
"a photo of star"), and that prediction is pulled toward the base model's (LoRA off, no
gradient) for the same caption: the LoRA learns the trigger, not a new look for every star.

Every family's training_loss goes through `predict_preserving`, so the math is written once."""
import contextlib
import re

import torch
from accelerate.utils import extract_model_from_parallel

from ..lora.inject import lora_strength


def class_caption(caption, trigger_word, class_word):
    """`caption` with each whole-word trigger replaced by `class_word`, or None where the caption
    does not hold the trigger (an empty, dropped-out caption; a dataset without a trigger)."""
    if not trigger_word or not class_word:
        return None
    pattern = rf"(?<!\w){re.escape(trigger_word)}(?!\w)"
    return re.sub(pattern, class_word, caption) if re.search(pattern, caption) else None


def preservation_batch(captions, trigger_word, class_word, encode, encode_base):
    """The batch entries preservation needs (the family contract's training_loss reads them):
    preservation_text / _pooled, the class captions encoded as the captions are (with a
    text-encoder LoRA: through it, with gradients); preservation_base_text / _pooled, the same
    encoded by the base text encoders; preservation_mask [B], 1 where the caption held the
    trigger. An entry without it carries its own caption and adds nothing."""
    swapped = [class_caption(caption, trigger_word, class_word) for caption in captions]
    texts = [caption if swap is None else swap for caption, swap in zip(captions, swapped)]
    text, pooled = encode(texts)
    base_text, base_pooled = encode_base(texts)
    return {"preservation_text": text, "preservation_pooled": pooled,
            "preservation_base_text": base_text, "preservation_base_pooled": base_pooled,
            "preservation_mask": torch.tensor([float(swap is not None) for swap in swapped])}


def base_encoding(family, pipeline, captions, device, text_encoders):
    """(text, pooled) of `captions` by the text encoders with their LoRA off, without gradients:
    what the base model reads, while a text-encoder LoRA trains."""
    with torch.no_grad(), lora_strength(list(text_encoders.values()), 0.0):
        return family.encode_batch(pipeline, captions, device)


@contextlib.contextmanager
def adapters_off(model):
    """The model's LoRA layers bypassed for the duration (peft's disable_adapters), then on
    again: peft turns their parameters' requires_grad back on, as training needs."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def predict_preserving(model, predict, noisy, per_entry, batch, weight):
    """(prediction [B, ...] of the batch, weight x the preservation loss; 0 when off).

    `predict(module, noisy, **per_entry)` is the family's prediction; `per_entry` holds the
    batch's per-entry inputs ([B, ...] each) and among them "text" and "pooled". Entries whose
    preservation_mask is set are predicted a second time, in the same call as the batch (one
    forward: DDP all-reduces once), with the class caption's text on the same noisy input and
    noise level; the base model predicts them with its adapters off and no gradient (the
    unwrapped module: outside DDP). The loss is each such entry's MSE, summed and divided by
    the batch size, so an entry without the trigger adds nothing."""
    mask = batch.get("preservation_mask")
    rows = (mask > 0).nonzero().flatten() if mask is not None and weight > 0 else None
    if rows is None or len(rows) == 0:
        return predict(model, noisy, **per_entry), noisy.new_zeros((), dtype=torch.float32)
    picked = {name: value[rows] for name, value in per_entry.items()}
    as_base = {**picked, "text": batch["preservation_base_text"][rows],
               "pooled": batch["preservation_base_pooled"][rows]}
    with torch.no_grad(), adapters_off(extract_model_from_parallel(model)) as base_model:
        base = predict(base_model, noisy[rows], **as_base)  # before the LoRA's forward: see adapters_off
    as_class = {**picked, "text": batch["preservation_text"][rows], "pooled": batch["preservation_pooled"][rows]}
    joined = {name: torch.cat([per_entry[name], as_class[name]]) for name in per_entry}
    prediction = predict(model, torch.cat([noisy, noisy[rows]]), **joined)
    size = len(noisy)
    drift = (prediction[size:].float() - base.float()).pow(2).flatten(1).mean(dim=1)
    return prediction[:size], weight * drift.sum() / size
