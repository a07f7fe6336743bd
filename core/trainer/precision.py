"""Which precisions a device can run, checked before any model loads, so an unsupported pair is
one plain sentence instead of a crash inside the first step or sample."""
import torch

from .. import UserError


class PrecisionError(UserError, ValueError):
    """model.dtype / train.dtype that this device cannot run; the message says what to use."""


def check_precision(model_dtype, train_dtype, device_type, quantize="none"):
    if device_type != "cuda" and quantize == "nf4":
        # bitsandbytes' CPU 4-bit path runs inference, but its backward fails under a LoRA
        raise PrecisionError(
            f"model.quantize = \"nf4\" trains only on a CUDA GPU (bitsandbytes 4-bit); this is a "
            f"{device_type}. Use model.quantize \"fp8\" (or \"auto\") here.")
    if device_type == "cuda" and "bf16" in (model_dtype, train_dtype) and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"model.dtype = {model_dtype!r}, train.dtype = {train_dtype!r}: this GPU has no bfloat16 "
            "support (it came with NVIDIA Ampere, RTX 30xx). Set both to \"fp16\", or to \"fp32\".")
    if device_type == "cpu" and model_dtype == "fp16" and train_dtype == "bf16":
        # torch's CPU autocast to bfloat16 refuses float16 inputs (at::autocast::prioritize)
        raise PrecisionError(
            "model.dtype = \"fp16\" with train.dtype = \"bf16\" is not supported on a CPU: torch's "
            "CPU autocast cannot mix float16 weights into bfloat16 compute. Use model.dtype \"bf16\" "
            "(or \"fp32\"), or train.dtype \"fp16\" or \"fp32\".")
