"""Latents and text embeddings, computed once per item so a training step runs only the model.

In memory, or on disk under a folder with one file per item whose name is a key of the image
bytes, the bucket size, the caption and the model: change any of them and the key changes."""
import hashlib
import os

import torch

from ..io import atomic_path
from .buckets import load_for_bucket


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(paths, extra=""):
    """Changes when the model's files change (path, sizes and modification times of its configs
    and weights: a diffusers folder and/or single files), without hashing gigabytes."""
    digest = hashlib.sha256(extra.encode())
    for path in [paths] if isinstance(paths, str) else paths:
        walked = sorted(os.walk(path)) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]
        for root, _, files in walked:
            for name in sorted(files):
                if name.endswith((".json", ".safetensors", ".bin", ".txt", ".model")):
                    stat = os.stat(os.path.join(root, name))
                    digest.update(f"{os.path.abspath(os.path.join(root, name))}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class Cache:
    """latent(image, size) -> [C, h, w] and text(caption) -> (embeddings, pooled), CPU tensors."""

    def __init__(self, folder=None, digests=None):
        self.folder = folder  # None keeps everything in memory only
        self.latents, self.texts = {}, {}
        # image index -> sha256 of its bytes; given when the caller has them (the run's
        # fingerprint), so no image is read twice for them
        self.digests = dict(digests or {})
        self.computed = 0  # how many entries were encoded (not found on disk): tests read it

    def _path(self, key):
        return os.path.join(self.folder, key[:2], key + ".pt") if self.folder else None

    def _read(self, key):
        path = self._path(key)
        if path and os.path.isfile(path):
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                return None  # a damaged cache file is recomputed, never trusted
        return None

    def _store(self, key, value):
        self.computed += 1
        if self.folder:
            with atomic_path(self._path(key)) as temporary:
                torch.save(value, temporary)
        return value

    def fill(self, items, sizes, captions, encode_image, encode_texts, model_key, on_progress=None):
        """Encode every (image, size) and caption that is not cached yet."""
        total = sum(len(s) for s in sizes.values())
        done = 0
        for index, image_sizes in sizes.items():
            digest = self.digests.get(index) or file_digest(items[index].path)
            self.digests[index] = digest
            for size in image_sizes:
                key = hashlib.sha256(f"latent:{model_key}:{digest}:{size}".encode()).hexdigest()
                value = self._read(key)
                if value is None:
                    value = self._store(key, encode_image(load_for_bucket(items[index].path, size)))
                self.latents[(index, size)] = value
                done += 1
                if on_progress:
                    on_progress(done, total)
        missing = []
        for caption in dict.fromkeys(captions):
            key = hashlib.sha256(f"text:{model_key}:{caption}".encode()).hexdigest()
            value = self._read(key)
            if value is None:
                missing.append((caption, key))
            else:
                self.texts[caption] = tuple(value)
        if missing:  # the text encoders run once, for all missing captions together
            encoded = encode_texts([caption for caption, _ in missing])
            for caption, key in missing:
                self.texts[caption] = self._store(key, tuple(encoded[caption]))

    def latent(self, image, size):
        return self.latents[(image, size)]

    def text(self, caption):
        return self.texts[caption]
