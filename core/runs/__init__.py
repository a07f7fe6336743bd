"""The run folder: resolved config, metrics, checkpoints, samples, plots."""
from .atomic import atomic_path, write_json
from .folder import RunFolder

__all__ = ["RunFolder", "atomic_path", "write_json"]
