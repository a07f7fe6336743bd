"""Latents and text embeddings, computed once per item so a training step runs only the model.

In memory, or on disk under a folder with one file per item whose name is a key of the image
bytes, the bucket size, the caption and the model: change any of them and the key changes."""
import collections
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


def _key(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _latent_kind(value, size):
    """((dtype, channels, downscale), None) for a latent [C, h, w] of the bucket `size` (width,
    height), or (None, why) when `value` is not one."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 3:
        return None, "is not a latent"
    (width, height), (_, h, w) = size, value.shape
    if not h or not w or height % h or width % w or height // h != width // w:
        return None, f"holds a latent of {w}x{h}, which is not one of a {width}x{height} image"
    if not torch.isfinite(value).all():
        return None, "holds NaN or inf"
    return (value.dtype, value.shape[0], height // h), None


def _text_kind(value, caption):
    """((dtype, shape) of the embeddings and of the pooled embedding, None), or (None, why)."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value)):
        return None, "is not a caption's embeddings"
    if not all(torch.isfinite(v).all() for v in value):
        return None, "holds NaN or inf"
    return tuple((v.dtype, tuple(v.shape)) for v in value), None


def _agreeing(found, kind_of):
    """The entries of `found` {entry: value read from disk} that are usable, and {entry: why}
    for the others: those `kind_of(value, entry)` refuses, and those whose kind (shape, dtype)
    differs from the most common one (a file of the cache replaced or damaged)."""
    kinds, refused = {}, {}
    for entry, value in found.items():
        kind, why = kind_of(value, entry)
        if why:
            refused[entry] = why
        else:
            kinds[entry] = kind
    common = collections.Counter(kinds.values()).most_common(1)
    for entry, kind in kinds.items():
        if kind != common[0][0]:
            refused[entry] = f"is shaped {kind}, unlike the others ({common[0][0]})"
    return {entry: found[entry] for entry in kinds if entry not in refused}, refused


class Cache:
    """latent(image, size) -> [C, h, w] and text(caption) -> (embeddings, pooled), CPU tensors.
    What is read back from disk is checked (finite, shaped as the others) and encoded again when
    it is not; fill() returns a note naming each such file."""

    def __init__(self, folder=None, digests=None):
        self.folder = folder  # None keeps everything in memory only
        self.latents, self.texts = {}, {}
        self.masks = {}  # (image, size) -> loss weight [1, h, w] with dataset.mask_folder / alpha_mask
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

    def _read_all(self, keys, kind_of, what):
        """{entry: usable value} of the entries {entry: key} found on disk, and a note for each
        file that is there but refused (it is encoded again)."""
        found = {entry: value for entry, value in ((e, self._read(k)) for e, k in keys.items())
                 if value is not None}
        usable, refused = _agreeing(found, kind_of)
        return usable, [f"cache file {self._path(keys[entry])} ({what(entry)}) {why}: encoded again"
                        for entry, why in refused.items()]

    def _store(self, key, value):
        self.computed += 1
        if self.folder:
            with atomic_path(self._path(key)) as temporary:
                torch.save(value, temporary)
        return value

    def fill(self, items, sizes, captions, encode_image, encode_texts, model_key, on_progress=None,
             make_mask=None):
        """Encode every (image, size) and caption that is not cached yet, or whose cache file is
        refused; returns the notes that name the refused files. `make_mask(image, size, latent's
        h, w)` gives an entry's loss mask, or None (masks are cheap: kept in memory only)."""
        keys = {}
        for index, image_sizes in sizes.items():
            digest = self.digests.get(index) or file_digest(items[index].path)
            self.digests[index] = digest
            keys.update({(index, size): _key(f"latent:{model_key}:{digest}:{size}") for size in image_sizes})
        found, notes = self._read_all(keys, lambda value, entry: _latent_kind(value, entry[1]),
                                      lambda e: f"latent of {os.path.basename(items[e[0]].path)} at {e[1][0]}x{e[1][1]}")
        for done, (entry, key) in enumerate(keys.items(), 1):
            if entry in found:
                self.latents[entry] = found[entry]
            else:
                self.latents[entry] = self._store(key, encode_image(load_for_bucket(items[entry[0]].path, entry[1])))
            mask = make_mask and make_mask(*entry, self.latents[entry].shape[-2:])
            if mask is not None:
                self.masks[entry] = mask
            if on_progress:
                on_progress(done, len(keys))
        keys = {caption: _key(f"text:{model_key}:{caption}") for caption in dict.fromkeys(captions)}
        found, refused = self._read_all(keys, _text_kind, lambda caption: f"embeddings of the caption "
                                        f"{caption[:40]!r}" + ("..." if len(caption) > 40 else ""))
        self.texts.update((caption, tuple(value)) for caption, value in found.items())
        missing = [caption for caption in keys if caption not in found]
        if missing:  # the text encoders run once, for all missing captions together
            encoded = encode_texts(missing)
            for caption in missing:
                self.texts[caption] = self._store(keys[caption], tuple(encoded[caption]))
        return notes + refused

    def latent(self, image, size):
        return self.latents[(image, size)]

    def mask(self, image, size):
        """The loss mask [1, h, w] of an entry; all ones for one without (a regularization image)."""
        found = self.masks.get((image, size))
        return found if found is not None else torch.ones(1, *self.latents[(image, size)].shape[-2:])

    def text(self, caption):
        return self.texts[caption]
