"""Caption embeddings for the loop: (text [B, seq, dim], pooled [B, dim]) of a list of captions,
from the cache (frozen text encoders), or encoded every step through a text-encoder LoRA."""
import torch

from ..families.preservation import base_encoding
from ..sampling import encoded_now


class CachedText:
    """The frozen text encoders' embeddings, cached once before training (the encoders are freed)."""
    def __init__(self, cache, sample_prompts):
        self.cache, self.sample_prompts = cache, sample_prompts
        self.encoders, self.parameters, self.groups = {}, [], []  # nothing of them is trained

    def encode(self, texts):
        return tuple(torch.stack(part) for part in zip(*map(self.cache.text, texts)))

    encode_base = encode  # the cache holds the base text encoders' embeddings

    def sample_embeds(self):
        return [self.cache.text(p) for p in self.sample_prompts], self.cache.text("")


class TrainedText:
    """network.text_encoder: the encoders stay, with a LoRA at their own rate (`groups`, for the
    optimizer), and encode every step."""

    def __init__(self, family, pipeline, device, sample_prompts, encoders, parameters, lr):
        self.family, self.pipeline, self.device = family, pipeline, device
        self.sample_prompts, self.encoders, self.parameters = sample_prompts, encoders, parameters
        self.groups = [{"params": parameters, "lr": lr}]

    def encode(self, texts):
        return self.family.encode_batch(self.pipeline, texts, self.device)

    def encode_base(self, texts):
        """The captions through the encoders with their LoRA off (preservation's reference)."""
        return base_encoding(self.family, self.pipeline, texts, self.device, self.encoders)

    def sample_embeds(self):
        return encoded_now(self.family, self.pipeline, self.sample_prompts, self.device)
