"""Find the images of a dataset folder, read their captions, and say what was skipped and why."""
import codecs
import os
import stat
import unicodedata
from dataclasses import dataclass, field

from .. import UserError
from .images import decode_upright

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# images PIL may read that are not trained on: listed as skipped, so none disappears unseen
OTHER_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl",
                          ".jp2", ".tga", ".ico", ".psd")
# A caption is read up to this many bytes and cut there, with a note: the text encoders read at
# most 512 T5 tokens (about 2,000 characters), and a 5 MB caption took 1.66 GB to encode.
CAPTION_LIMIT = 4096


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
    notes: list = field(default_factory=list)    # (caption file name, what was changed in reading it)

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


def _not_a_plain_file(path, folder):
    """Why `path` (an entry of `folder`) is not read, or None: only regular files are, and links
    only to regular files inside the folder (a FIFO would hang a read, a device never ends)."""
    try:
        if os.path.islink(path):
            real, inside = os.path.realpath(path), os.path.realpath(folder)
            if os.path.commonpath([real, inside]) != inside:
                return "a link to a file outside the dataset folder: copy the file in to use it"
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file (a FIFO, device or socket): it is not read"
    except OSError as error:  # a broken link, or removed meanwhile
        return f"cannot be read ({error.strerror})"
    return None


def _decode(data, cut):
    """The text of caption bytes and a note when they were not plain UTF-8: a byte-order mark is
    dropped, UTF-16 (with its mark) read as such, other bytes read as Windows-1252 (Latin-1), not
    as replacement characters. A character cut at the byte limit is dropped."""
    for mark, encoding in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(mark):
            body = data[len(mark):]
            return body[:len(body) // 2 * 2].decode(encoding, errors="replace"), None
    try:
        return codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=not cut), None
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:  # bytes cp1252 leaves undefined
            text = data.decode("latin-1")
        return text, "not UTF-8: read as Windows-1252 (Latin-1); re-save it as UTF-8 if its accents look wrong"


def _read_caption(image_path, caption_ext, folder):
    """(caption, has a caption file, notes): at most CAPTION_LIMIT bytes are read, whitespace and
    control characters become single spaces."""
    caption_path = os.path.splitext(image_path)[0] + "." + caption_ext.lstrip(".")
    if not os.path.lexists(caption_path):
        return "", False, []
    why = _not_a_plain_file(caption_path, folder)
    if why:
        return "", False, [why]
    with open(caption_path, "rb") as f:
        data = f.read(CAPTION_LIMIT + 1)
    cut = len(data) > CAPTION_LIMIT
    text, note = _decode(data[:CAPTION_LIMIT], cut)
    notes = [note] if note else []
    if cut:
        notes.append(f"longer than {CAPTION_LIMIT} bytes: only its first {CAPTION_LIMIT} are read "
                     "(the text encoders read about 2,000 characters at most)")
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split()), True, notes


def scan_folder(folder, caption_ext="txt", trigger_word="", key="dataset.folder"):
    """Read every image of `folder` (not recursive). Unreadable images, images of other types and
    entries that are not plain files are listed in `skipped` with the reason; what changed in
    reading a caption file in `notes`. A missing folder or one with no usable image raises
    DatasetError, which names the setting `key`."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.exists(folder):
        raise DatasetError(f"dataset folder not found: {folder} ({key}). Give the path "
                           "of a folder of .jpg/.png/.webp images with same-name .txt captions.")
    if not os.path.isdir(folder):
        raise DatasetError(f"{key} is a file, not a folder: {folder}")
    scan = Scan(folder)
    for name in sorted(os.listdir(folder)):
        path, extension = os.path.join(folder, name), os.path.splitext(name)[1].lower()
        if os.path.isdir(path):
            continue
        if extension in OTHER_IMAGE_EXTENSIONS:
            scan.skipped.append((name, f"a {extension} image: LoRA Lab trains on .jpg, .jpeg, .png and "
                                       ".webp; convert it to train on it"))
            continue
        if extension not in IMAGE_EXTENSIONS:
            continue
        why = _not_a_plain_file(path, folder)
        if why:
            scan.skipped.append((name, why))
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
        caption, has_caption, notes = _read_caption(path, caption_ext, folder)
        caption_name = os.path.splitext(name)[0] + "." + caption_ext.lstrip(".")
        scan.notes.extend((caption_name, note) for note in notes)
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
    scan.notes.extend((os.path.join(regularization.folder, name), note) for name, note in regularization.notes)
    return list(range(first, len(scan.items)))
