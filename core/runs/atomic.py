"""Atomic, durable file writes: a reader (or a resumed run) sees the old file or the new one,
never half, and after a power cut the new one is really on disk.

A temporary is named `.tmp-<12 hex>-<final name>` (TEMPORARY below) beside the final file, so
one that a kill left behind is recognisable: RunFolder.clean_temporaries removes them."""
import contextlib
import json
import os
import re
import secrets

TEMPORARY = re.compile(r"^\.tmp-[0-9a-f]{12}-.+$")


def temporary_name(path):
    return os.path.join(os.path.dirname(path), f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")


def fsync_file(path):
    fd = os.open(path, os.O_RDWR)  # Windows' fsync (_commit) needs a handle that may write
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder):
    """Makes a rename (or a new file) in `folder` durable. Windows cannot open a folder: a no-op."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success the temporary is fsynced and replaces
    `path` in one rename, and the folder is fsynced. The temporary is created with mode
    0o666 & ~umask (0644 under the usual umask), as open() would create the file itself."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    while True:
        temporary = temporary_name(path)
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 48 random bits met an existing name
            continue
    mode = os.stat(temporary).st_mode & 0o777  # 0o666 & ~umask, read without touching the umask
    try:
        yield temporary
        if os.stat(temporary).st_mode & 0o777 != mode:  # a writer that made its own file (safetensors: 0600)
            os.chmod(temporary, mode)
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_folder(folder)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")


def append_line(path, text):
    """Appends one line and makes it durable (flush + fsync): a kill or power cut can at worst
    tear this last line, which readers drop (RunFolder.read_metrics)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_image(image, path):
    """A PIL image written atomically; the format follows the final name's extension."""
    with atomic_path(path) as temporary:
        image.save(temporary, format=os.path.splitext(path)[1][1:].upper().replace("JPG", "JPEG"))
    return path
