"""The training loop (accelerate): optimizer, schedule, checkpoints, resume, events."""
from .checkpoints import NonFiniteWeights, ResumeError, write_lora
from .loop import OutOfMemory, TrainResult, train
from .precision import PrecisionError, check_precision

__all__ = ["NonFiniteWeights", "OutOfMemory", "PrecisionError", "ResumeError", "check_precision", "TrainResult",
           "train", "write_lora"]
