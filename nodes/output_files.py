"""Numbered output files inside a root folder (loras, grids), like ComfyUI's own save nodes:
<prefix>_<counter>.<ext>, never overwriting, and never outside the root."""
import os
import re

MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096  # a file name, a whole path (Linux, most others)
COUNTER_BYTES = len("_00000")  # what numbered_file adds to a prefix, before the extension


def _cut(text, limit=40):
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def path_problem(label, value, reserve=0, one_name=False):
    """Why `value` cannot go to the file system as a path (one_name: a single file name), or
    None: not a string, a control character, a name over 255 bytes (`reserve` of them being
    what the node adds to the last name), over 4096 bytes in all. For VALIDATE_INPUTS."""
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        return f"{label}: expected a string, found {type(value).__name__} {shown}"
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return (f"{label}: {_cut(value)} holds the control character {bad!r} at position "
                f"{value.index(bad)}; expected a name without control characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        return (f"{label}: {_cut(value)} holds {value[error.start]!r} at position {error.start}, "
                "which is no character (a lone surrogate); expected a name of real characters")
    if size + reserve > MAX_PATH_BYTES:
        return (f"{label}: {_cut(value)} is {size} bytes long; expected at most "
                f"{MAX_PATH_BYTES - reserve} (a path's limit)")
    names = [value] if one_name else re.split(r"[\\/]", value)
    for index, name in enumerate(names):
        limit = MAX_NAME_BYTES - (reserve if index == len(names) - 1 else 0)
        if len(name.encode("utf-8")) > limit:
            return (f"{label}: the name {_cut(name)} is {len(name.encode('utf-8'))} bytes long; "
                    f"expected at most {limit} (a file name's limit"
                    + (f", less the {reserve} the node adds)" if reserve else ")"))
    return None


def check_prefix(prefix, extension=".safetensors"):
    """Raises ValueError when `prefix` is no string, too long or odd for a file name, empty, or
    would leave the folder it is relative to."""
    problem = path_problem("filename_prefix", prefix, COUNTER_BYTES + len(extension))
    if problem:
        raise ValueError(problem)
    if not prefix.strip():
        raise ValueError("filename_prefix is empty: give a name such as loralab/my_lora")
    parts = re.split(r"[\\/]", prefix)
    if os.path.isabs(prefix) or os.path.splitdrive(prefix)[0] or prefix.startswith(("/", "\\")):
        raise ValueError(f"filename_prefix {prefix!r} is an absolute path; give a name relative "
                         "to the output folder, e.g. loralab/my_lora")
    if ".." in parts:
        raise ValueError(f"filename_prefix {prefix!r} would leave the output folder ('..' is "
                         "not allowed); give a name such as loralab/my_lora")


def numbered_file(root, prefix, extension):
    """The next free root/<prefix>_<5-digit counter><extension>; creates its folder."""
    check_prefix(prefix, extension)
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, prefix))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"filename_prefix {prefix!r} does not name a file inside {root}")
    if len(os.fsencode(path)) + COUNTER_BYTES + len(extension) > MAX_PATH_BYTES:
        raise ValueError(f"filename_prefix {_cut(prefix)} makes a path over {MAX_PATH_BYTES} "
                         f"bytes inside {root}; give a shorter name")
    folder, stem = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    numbered = re.compile(rf"^{re.escape(stem)}_(\d+){re.escape(extension)}$")
    taken = [int(m.group(1)) for m in map(numbered.match, os.listdir(folder)) if m]
    return os.path.join(folder, f"{stem}_{max(taken, default=0) + 1:05d}{extension}")
