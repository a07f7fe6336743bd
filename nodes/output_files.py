"""Numbered output files inside a root folder (loras, grids), like ComfyUI's own save nodes:
<prefix>_<counter>.<ext>, never overwriting, and never outside the root."""
import os
import re


def check_prefix(prefix):
    """Raises ValueError when `prefix` is empty or would leave the folder it is relative to."""
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
    check_prefix(prefix)
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, prefix))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"filename_prefix {prefix!r} does not name a file inside {root}")
    folder, stem = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    numbered = re.compile(rf"^{re.escape(stem)}_(\d+){re.escape(extension)}$")
    taken = [int(m.group(1)) for m in map(numbered.match, os.listdir(folder)) if m]
    return os.path.join(folder, f"{stem}_{max(taken, default=0) + 1:05d}{extension}")
