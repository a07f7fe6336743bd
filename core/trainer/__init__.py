"""The training loop (accelerate): optimizer, schedule, checkpoints, resume, events."""
from .checkpoints import write_lora
from .loop import ResumeError, TrainResult, train

__all__ = ["ResumeError", "TrainResult", "train", "write_lora"]
