"""Atomic, durable file writes: a reader (or a resumed run) sees the old file or the new one,
never half, and after a power cut the new one is really on disk.

A temporary is named `.tmp-<12 hex>-<final name>` (TEMPORARY below) beside the final file, so
one that a kill left behind is recognisable: RunFolder.clean_temporaries removes them.
A full disk (or quota) while writing raises DiskFull, a UserError naming the file and folder."""
import contextlib
import errno
import json
import os
import re
import secrets

from .. import UserError
from .paths import open_fd

TEMPORARY = re.compile(r"^\.tmp-[0-9a-f]{12}-.+$")


class DiskFull(UserError, OSError):
    """No space left (or the quota reached) while writing a file; the earlier files are intact."""


def _disk_full(error):
    """Whether `error` says the disk is full: OSError's errno, or the text of a writer that wraps
    it in its own exception (safetensors: "No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return f"(os error {errno.ENOSPC})" in str(error) or "No space left on device" in str(error)


@contextlib.contextmanager
def disk_full_named(path):
    """Turns a full disk while writing `path` into DiskFull, which says what ran out and where."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if not _disk_full(error):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise DiskFull(f"no space left on the disk of {folder} while writing "
                       f"{os.path.basename(path)}: free space there or choose another output "
                       "folder (the files written before are intact)") from None


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
    with disk_full_named(path):
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
        with disk_full_named(path):
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
    tear this last line, which readers drop (RunFolder.read_metrics). Never through a link."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with disk_full_named(path), os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_image(image, path):
    """A PIL image written atomically; the format follows the final name's extension."""
    with atomic_path(path) as temporary:
        image.save(temporary, format=os.path.splitext(path)[1][1:].upper().replace("JPG", "JPEG"))
    return path
