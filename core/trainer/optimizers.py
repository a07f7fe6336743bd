"""Optimizers and learning-rate schedules by name (train.optimizer, train.lr_scheduler)."""
import torch
from diffusers.optimization import get_scheduler

from .. import quiet_optional_kernel_notes


def make_optimizer(name, parameters, lr):
    quiet_optional_kernel_notes()
    if name == "adamw8bit":
        import bitsandbytes  # 8-bit states: about a quarter of AdamW's optimizer memory

        return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=1e-4)
    if name == "adamw":
        # fused: one kernel for all LoRA tensors instead of a Python loop over hundreds of them
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4, fused=True)
    if name == "lion":
        import bitsandbytes

        return bitsandbytes.optim.Lion8bit(parameters, lr=lr, weight_decay=1e-4)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy  # finds its own step size: lr is a multiplier, use 1.0
        except ImportError:
            raise ValueError('train.optimizer = "prodigy" needs the prodigyopt package, an optional '
                             'extra: pip install "comfyui-loralab[prodigy]" (or pip install prodigyopt) '
                             'in the Python that runs LoRA Lab, or choose adamw8bit') from None

        return Prodigy(parameters, lr=lr, weight_decay=1e-4, safeguard_warmup=True, use_bias_correction=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    raise ValueError(f"train.optimizer = {name!r} is not known")


def make_scheduler(name, optimizer, warmup_steps, total_steps):
    """diffusers' schedules, with their meanings: "constant" ignores warm-up,
    "constant_with_warmup", "linear" and "cosine" rise from 0 over warmup_steps first; "linear"
    and "cosine" then fall to 0 at total_steps. Stepped once per optimizer update."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
