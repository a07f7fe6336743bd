"""The one rule for a path that comes from outside (a node input, a workflow, a file we wrote and
read back): a name resolves only inside the folder it belongs to, and what we read is a regular
file of bounded size, opened without following a link (docs/architecture.md, "Paths")."""
import errno
import json
import os
import re
import stat

import jsonschema

from .. import UserError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has none: links are checked with lstat there
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # so that opening a FIFO never waits for a writer
MAX_JSON_BYTES = 16 * 2**20              # a config, a workflow, a run's JSON file: far below this
MAX_JSON_DEPTH = 64                      # nesting; the settings need 3, a workflow a few more


class UnsafePath(UserError, ValueError):
    """A name from an input that would leave its folder: absolute, `..`, or a link leading out."""


class UnreadableFile(UserError, ValueError):
    """A file that is not read: a link, not a regular file (FIFO, device, folder), too large,
    or not the JSON expected. The message names the file and why."""


def _shown(text, limit=200):
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def name_problem(label, name):
    """Why `name` is not a relative path that stays inside its folder, or None: only the text is
    looked at (so the answer never tells whether a file exists)."""
    if not isinstance(name, str) or not name.strip():
        return f"{label}: expected a name, found {name!r:.60}"
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\", "~")):
        return f"{label}: {_shown(name)} is an absolute path; give a name inside the folder"
    if ".." in re.split(r"[\\/]", name):
        return f"{label}: {_shown(name)} leaves the folder ('..' is not allowed); give a name inside it"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{label}: {_shown(name)} holds a control character; give a plain name"
    return None


def inside(root, name, label):
    """root/name, refused with UnsafePath unless it stays inside `root` once links are resolved."""
    problem = name_problem(label, name)
    if problem:
        raise UnsafePath(problem)
    root = os.path.realpath(root)
    path = os.path.join(root, os.path.normpath(name))
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise UnsafePath(f"{label}: {_shown(name)} leads out of {root} through a link; give a "
                         "name inside the folder")
    return path


def folder_inside(roots, name, label):
    """The folder `name` names inside the first of `roots` that holds it, or None when none does.
    UnsafePath when the name would leave them, whether or not what it names exists."""
    for root in roots:
        path = inside(root, name, label)
        if os.path.isdir(path):
            return path
    return None


def open_fd(path, flags, follow_links=False, max_bytes=None, mode=0o666):
    """os.open(path, flags) for a regular file: never through a link (unless follow_links), never
    a FIFO (no wait for a writer), a device or a folder, at most `max_bytes` long, and never one
    with a second hard link when written; else UnreadableFile. OSError when missing."""
    flags |= NONBLOCK | (0 if follow_links else NOFOLLOW)
    if not follow_links and not NOFOLLOW and os.path.islink(path):  # pragma: no cover - Windows
        raise UnreadableFile(f"{path} is a link: it is not followed")
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links:
            raise UnreadableFile(f"{path} is a link: it is not followed") from None
        raise
    info, problem = os.fstat(fd), None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file (a FIFO, device or folder)"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"is {info.st_size} bytes, over the {max_bytes} read at most"
    elif flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink > 1:
        problem = "has another hard link, so writing it would change another file"
    if problem:
        os.close(fd)
        raise UnreadableFile(f"{path} {problem}: not opened")
    os.set_blocking(fd, True)
    return fd


def open_regular(path, follow_links=False, max_bytes=None):
    """A binary file object to read a regular file (see open_fd)."""
    return os.fdopen(open_fd(path, os.O_RDONLY, follow_links, max_bytes), "rb")


def json_depth(value):
    """How deeply lists and objects nest in `value` (a scalar: 0); iterative, so any depth counts."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_json(path, follow_links=False, max_bytes=MAX_JSON_BYTES):
    """The JSON value in a regular file. UnreadableFile names the file and says why: a link, not a
    regular file, too large, not UTF-8 JSON (with line and column), nested over MAX_JSON_DEPTH."""
    with open_regular(path, follow_links, max_bytes) as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"{path} is not UTF-8 text (byte {error.start}): expected JSON") from None
    except json.JSONDecodeError as error:
        raise UnreadableFile(f"{path} is not valid JSON: line {error.lineno}, column {error.colno}: "
                             f"{error.msg}") from None
    except RecursionError:
        raise UnreadableFile(f"{path} nests lists or objects too deeply to read") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise UnreadableFile(f"{path} nests lists or objects {json_depth(value)} deep, over the "
                             f"{MAX_JSON_DEPTH} read at most")
    return value


def schema_problem(value, schema):
    """Where and how `value` departs from the JSON Schema `schema` ("step: 'x' is not of type
    'integer'"), or None when it matches."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    return f"{'/'.join(map(str, error.absolute_path)) or 'top level'}: {error.message[:200]}"


def read_checked_json(path, schema):
    """read_json (never through a link), then checked against the JSON Schema `schema`;
    UnreadableFile "damaged: <path>: <where>: <what>" when it does not match."""
    value = read_json(path)
    problem = schema_problem(value, schema)
    if problem:
        raise UnreadableFile(f"damaged: {path}: {problem}")
    return value
