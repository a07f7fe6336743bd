"""Step checkpoints: the LoRA file users keep, plus the state a resumed run needs. The state is
written first and the LoRA file last, each atomically, so a checkpoint whose LoRA file exists is
complete."""
import random

import numpy
import torch

from ..lora import file_metadata, file_tensors, save_lora_file
from ..runs.atomic import atomic_path


def write_lora(path, weights, config, step, to_kohya=None, fmt=None, dtype=None):
    network = config["network"]
    fmt = fmt or config["save"]["format"]
    tensors = file_tensors(weights, network["linear"], network["linear_alpha"], fmt,
                           dtype or config["save"]["dtype"], to_kohya=to_kohya)
    metadata = file_metadata(config, step, network["linear"], network["linear_alpha"], fmt)
    return save_lora_file(path, tensors, metadata)


def save_checkpoint(run, step, weights, optimizer, scheduler, config, to_kohya=None):
    state = {
        "step": step,
        "lora": weights,  # float32: resuming from the float16 file would round the weights
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": numpy.random.get_state(),
                "python": random.getstate()},
    }
    with atomic_path(run.checkpoint_state(step)) as temporary:
        torch.save(state, temporary)
    write_lora(run.checkpoint(step), weights, config, step, to_kohya)
    return run.checkpoint(step)


def load_checkpoint_state(run, step):
    state = torch.load(run.checkpoint_state(step), weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    numpy.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state
