"""The bottom layer of file access: atomic writes, and the path rule (paths.py) for every name
that comes from outside. Imports nothing of LoRA Lab but core's UserError."""
from .atomic import DiskFull, append_line, atomic_path, disk_full_named, save_image, write_json
from .paths import (UnreadableFile, UnsafePath, folder_inside, inside, name_problem, open_fd, open_regular,
                    read_checked_json, read_json, schema_problem)

__all__ = ["DiskFull", "UnreadableFile", "UnsafePath", "append_line", "atomic_path", "disk_full_named",
           "folder_inside", "inside", "name_problem", "open_fd", "open_regular", "read_checked_json", "read_json",
           "save_image", "schema_problem", "write_json"]
