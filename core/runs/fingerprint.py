"""The dataset fingerprint recorded with every run: one hash of the image bytes and the captions
as trained, so two runs can tell whether they saw the same data (names and folders aside)."""
import hashlib


def dataset_fingerprint(scan):
    """"sha256:<hex>" over each image's bytes and caption, in the scan's (sorted) order."""
    total = hashlib.sha256()
    for item in scan.items:
        image = hashlib.sha256()
        with open(item.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                image.update(block)
        total.update(image.digest())
        total.update(hashlib.sha256(item.caption.encode("utf-8")).digest())
    return "sha256:" + total.hexdigest()
