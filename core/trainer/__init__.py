"""The training loop (accelerate): optimizer, schedule, checkpoints, resume, events."""
from .checkpoints import write_lora
from .loop import OutOfMemory, ResumeError, TrainResult, train

__all__ = ["OutOfMemory", "ResumeError", "TrainResult", "train", "write_lora"]
