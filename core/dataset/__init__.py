"""Image folder + captions -> items, buckets, batch order, and the latent/text cache."""
from .batches import BatchPlan, Entry, image_sizes, regularization_entries
from .buckets import bucket_size, load_for_bucket
from .holdout import hold_out
from .scan import DatasetError, Item, Scan, add_regularization, apply_trigger, scan_folder

__all__ = ["BatchPlan", "Cache", "DatasetError", "Entry", "Item", "Scan", "add_regularization", "apply_trigger",
           "bucket_size", "hold_out", "image_sizes", "load_for_bucket", "model_fingerprint",
           "regularization_entries", "scan_folder"]


def __getattr__(name):
    """Cache and model_fingerprint load torch (a second): only when a run caches, not when
    `loralab plan` or LoadDataset's report scans a folder."""
    if name in ("Cache", "model_fingerprint"):
        from . import cache
        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
