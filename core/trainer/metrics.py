"""Peak memory and the versions recorded with every run."""
import platform
import resource
import sys

import torch


def peak_memory_mb(device):
    """(CPU peak RSS, GPU peak allocated or None) in MiB."""
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(device) / 2**20
    return round(cpu, 1), (round(gpu, 1) if gpu is not None else None)


def versions():
    import accelerate
    import diffusers
    import peft

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}
