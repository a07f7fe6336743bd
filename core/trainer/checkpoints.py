"""Step checkpoints: the LoRA file users keep, plus the state a resumed run needs.

The resume state is two files, never a pickle (a run folder is user-writable; unpickling runs
whatever code a planted file holds): <name>_<step>.state.safetensors holds the tensors (the
float32 LoRA weights, the optimizer's state tensors) and <name>_<step>.state.json the rest (step,
scheduler state, the optimizer's param groups and plain values) with each tensor as a reference
into the first. A token in both ties the pair together. They are written first and the LoRA file
last, each atomically, so a checkpoint whose LoRA file exists is complete. No RNG state is kept:
the loop reseeds its generator every step."""
import json
import os
import secrets

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..families import get_family
from ..lora import file_metadata, file_tensors, save_lora_file
from ..io import atomic_path

STATE_FORMAT = "loralab-resume-state/1"


class StateError(ValueError):
    """A checkpoint's resume state cannot be loaded; the message names its files and why."""


def write_lora(path, weights, config, step, to_kohya=None, fmt=None, dtype=None):
    family = get_family(config["model"]["family"])
    fmt = fmt or config["save"]["format"]
    tensors = file_tensors(weights, config["network"], fmt, dtype or config["save"]["dtype"],
                           to_kohya=to_kohya, to_diffusers=family.lora_to_diffusers)
    metadata = file_metadata(config, step, fmt, family.KOHYA_METADATA)
    return save_lora_file(path, tensors, metadata)


# -- nested state <-> (JSON, tensors) ---------------------------------------------------------------

def _split(value, tensors, where):
    """`value` as JSON-plain data; its tensors go into `tensors` under their path in the data."""
    if isinstance(value, torch.Tensor):
        key = where or "tensor"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _split(v, tensors, f"{where}/{k}") for k, v in value.items()}
        return {"__items__": [[_split(k, tensors, f"{where}/key{i}"), _split(v, tensors, f"{where}/{k}")]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store a {type(value).__name__} in a resume state (at {where or 'top'})")


def _join(value, tensors):
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_join(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__items__"]}
    if "__dtype__" in value:
        dtype = getattr(torch, value["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['__dtype__']!r}")
        return dtype
    return {k: _join(v, tensors) for k, v in value.items()}


# -- save and load ---------------------------------------------------------------------------------

def save_checkpoint(run, step, weights, optimizer, scheduler, config, to_kohya=None):
    """Writes the resume state (tensors, then JSON) and then the LoRA file; returns its path."""
    tensors = {}
    data = {
        "format": STATE_FORMAT,
        "token": secrets.token_hex(16),
        "step": step,
        # float32: resuming from the float16 LoRA file would round the weights
        "lora": _split(dict(weights), tensors, "lora"),
        "optimizer": _split(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": _split(scheduler.state_dict(), tensors, "scheduler"),
    }
    with atomic_path(run.checkpoint_state(step)) as temporary:
        save_file(tensors, temporary, metadata={"format": STATE_FORMAT, "token": data["token"]})
    with atomic_path(run.checkpoint_state_json(step)) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f)
    write_lora(run.checkpoint(step), weights, config, step, to_kohya)
    return run.checkpoint(step)


def load_checkpoint_state(run, step):
    """{"step", "lora", "optimizer", "scheduler"} of the step checkpoint `step`, tensors on the
    CPU. Raises StateError naming the files when they are missing, torn, mismatched or not ours.
    Never unpickles anything."""
    tensors_path, json_path = run.checkpoint_state(step), run.checkpoint_state_json(step)
    where = f"the resume state of step {step} ({json_path} + {os.path.basename(tensors_path)})"
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        with safe_open(tensors_path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("token") != data.get("token"):
                raise ValueError("its two files come from different saves")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        state = {key: _join(data[key], tensors) for key in ("lora", "optimizer", "scheduler")}
        if data.get("step") != step:
            raise ValueError(f"it says step {data.get('step')!r}")
        if not isinstance(state["lora"], dict) or not state["lora"]:
            raise ValueError("it holds no LoRA weights")
    except FileNotFoundError as error:
        raise StateError(f"{where} is incomplete: {error.filename} is missing") from None
    except Exception as error:  # noqa: BLE001 - whatever a damaged file does, it is refused
        raise StateError(f"{where} cannot be loaded: {error}") from None
    return {"step": step, **state}


def load_resume_state(run):
    """The newest step checkpoint whose resume state loads: ((step, state), warnings), or
    (None, warnings) when there is none. A checkpoint whose state is refused (StateError) is
    skipped, with a warning naming it, and the one before it tried; step files of earlier versions
    (.state.pt, a pickle) are never loaded and are named too."""
    warnings = []
    for step in reversed(run.checkpoints()):
        if run.has_state(step):
            try:
                return (step, load_checkpoint_state(run, step)), warnings
            except StateError as error:
                warnings.append(f"{error}; resuming from an earlier checkpoint instead.")
        elif os.path.isfile(run.legacy_checkpoint_state(step)):
            warnings.append(f"{run.legacy_checkpoint_state(step)} is a resume state of an earlier "
                            "LoRA Lab (a pickle, which could run any code): it is not loaded.")
    return None, warnings
