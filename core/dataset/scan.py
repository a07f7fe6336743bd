"""Find the images of a dataset folder, read their captions, and say what was skipped and why."""
import os
from dataclasses import dataclass, field

from .. import UserError
from .images import decode_upright

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be trained on; the message says which path and what to do."""


@dataclass
class Item:
    path: str
    caption: str
    width: int
    height: int
    has_caption_file: bool = True


@dataclass
class Scan:
    folder: str
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (file name, reason)

    @property
    def missing_captions(self):
        return [os.path.basename(item.path) for item in self.items if not item.has_caption_file]


def apply_trigger(caption, trigger_word):
    """[trigger] becomes the trigger word; a caption without it gets it in front."""
    if not trigger_word:
        return caption.replace("[trigger]", "").strip()
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger_word)
    if trigger_word in caption:
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def _read_caption(image_path, caption_ext):
    caption_path = os.path.splitext(image_path)[0] + "." + caption_ext.lstrip(".")
    if not os.path.isfile(caption_path):
        return "", False
    with open(caption_path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split()), True


def scan_folder(folder, caption_ext="txt", trigger_word="", key="dataset.folder"):
    """Read every image of `folder` (not recursive). Unreadable images are listed in `skipped`
    with the reason; a missing folder or one with no usable image raises DatasetError, which
    names the setting `key`."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.exists(folder):
        raise DatasetError(f"dataset folder not found: {folder} ({key}). Give the path "
                           "of a folder of .jpg/.png/.webp images with same-name .txt captions.")
    if not os.path.isdir(folder):
        raise DatasetError(f"{key} is a file, not a folder: {folder}")
    scan = Scan(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        try:
            # One full decode: verify() passes a half-written JPEG that then fails at training,
            # and the size that counts is the one after EXIF rotation (a phone's portrait photo
            # is stored landscape with orientation 6).
            width, height = decode_upright(path).size
        except Exception as error:  # PIL raises many types for bad files
            scan.skipped.append((name, f"cannot be read as an image ({type(error).__name__}: {error}); "
                                       "re-save or replace it to train on it"))
            continue
        caption, has_caption = _read_caption(path, caption_ext)
        scan.items.append(Item(path, apply_trigger(caption, trigger_word), width, height, has_caption))
    if not scan.items:
        why = "; ".join(f"{n}: {r}" for n, r in scan.skipped) or "it holds no .jpg/.jpeg/.png/.webp file"
        raise DatasetError(f"no usable image in dataset folder {folder} ({key}): {why}")
    return scan


def add_regularization(scan, regularization):
    """Appends the scan `regularization` (dataset.regularization_folder) to `scan`, its skipped
    files named with their folder; returns the new items' indices into scan.items."""
    first = len(scan.items)
    scan.items.extend(regularization.items)
    scan.skipped.extend((os.path.join(regularization.folder, name), reason)
                        for name, reason in regularization.skipped)
    return list(range(first, len(scan.items)))
