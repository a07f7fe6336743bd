"""The dataset fingerprint recorded with every run: one hash of the image bytes and the captions
as trained, so two runs can tell whether they saw the same data (names and folders aside)."""
import hashlib

from ..dataset.cache import file_digest


def dataset_fingerprint(scan, digests=None):
    """"sha256:<hex>" over each image's bytes and caption, in the scan's (sorted) order.
    `digests` (image index -> hex sha256, as the latent cache computed them) saves a second read."""
    total = hashlib.sha256()
    for index, item in enumerate(scan.items):
        digest = (digests or {}).get(index) or file_digest(item.path)
        total.update(bytes.fromhex(digest))
        total.update(hashlib.sha256(item.caption.encode("utf-8")).digest())
    return "sha256:" + total.hexdigest()
