"""The training loop (accelerate): optimizer, schedule, checkpoints, resume, events."""
from .checkpoints import write_lora
from .loop import TrainResult, train

__all__ = ["TrainResult", "train", "write_lora"]
