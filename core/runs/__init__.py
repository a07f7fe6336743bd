"""The run folder: resolved config, metrics, checkpoints, samples, plots."""
from ..io import atomic_path, write_json
from .folder import RunFolder, RunLocked
from .identity import choose_run_folder, run_identity

__all__ = ["RunFolder", "RunLocked", "atomic_path", "choose_run_folder", "run_identity", "write_json"]
