"""The training loop (accelerate): optimizer, schedule, checkpoints, resume, events."""
from .checkpoints import write_lora
from .loop import OutOfMemory, ResumeError, TrainResult, train
from .precision import PrecisionError, check_precision

__all__ = ["OutOfMemory", "PrecisionError", "ResumeError", "check_precision", "TrainResult", "train", "write_lora"]
