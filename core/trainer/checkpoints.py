"""Step checkpoints: the LoRA file users keep, plus the state a resumed run needs.

The resume state is two files, never a pickle (a run folder is user-writable; unpickling runs
whatever code a planted file holds): <name>_<step>.state.safetensors holds the tensors (the
float32 LoRA weights, the optimizer's state tensors, with train.ema the EMA's) and <name>_<step>.state.json the rest (step,
scheduler state, the optimizer's param groups and plain values) with each tensor as a reference
into the first. A token in both ties the pair together. They are written first and the LoRA file
last, each atomically, so a checkpoint whose LoRA file exists is complete. No RNG state is kept:
the loop reseeds its generator every step."""
import json
import math
import os
import secrets

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import UserError
from ..families import get_family
from ..io import atomic_path
from ..lora import file_metadata, file_tensors, load_lora_weights, lora_weights, save_lora_file

STATE_FORMAT = "loralab-resume-state/1"
REQUIRED = ("lora", "optimizer", "scheduler")
STATE_KEYS = REQUIRED + ("ema", "ema_lora")   # the EMA's with train.ema
LARGEST_INTEGER = 2 ** 53  # a step or count beyond this is no training's: float math overflows on it


class StateError(ValueError):
    """A checkpoint's resume state cannot be loaded; the message names its files and why."""


class ResumeError(UserError, ValueError):
    """The run folder's checkpoints do not fit this config."""


class NonFiniteWeights(UserError, ValueError):
    """LoRA weights that hold NaN or inf: never written as a LoRA or a checkpoint."""


def refuse_nonfinite(tensors, path, dtype=None):
    """Raises NonFiniteWeights when a tensor of `tensors` (what would be written to `path`, in
    `dtype` when given) is not finite: a run whose weights are not finite never ends as a success."""
    bad = [key for key, value in tensors.items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteWeights(
            f"the LoRA weights hold NaN or inf ({len(bad)} of {len(tensors)} tensors, e.g. {bad[0]}"
            + (f", in save.dtype {dtype}" if dtype else "") + f"), so {path} is not written; the "
            "checkpoints written before are kept. Likely cause: a learning rate far too high, "
            "or weights beyond float16's range (65504): lower train.lr, or use save.dtype "
            "bfloat16/float32.")


def _lora_file(path, weights, config, step, to_kohya=None, fmt=None, dtype=None):
    """(tensors, metadata) of the LoRA file `path`, refused (NonFiniteWeights) when a tensor is
    not finite in the file's dtype: float16 turns a weight of 1e5 into inf."""
    family = get_family(config["model"]["family"])
    fmt, dtype = fmt or config["save"]["format"], dtype or config["save"]["dtype"]
    tensors = file_tensors(weights, config["network"], fmt, dtype,
                           to_kohya=to_kohya, to_diffusers=family.lora_to_diffusers)
    refuse_nonfinite(tensors, path, dtype)
    return tensors, file_metadata(config, step, fmt, family.KOHYA_METADATA)


def write_lora(path, weights, config, step, to_kohya=None, fmt=None, dtype=None):
    return save_lora_file(path, *_lora_file(path, weights, config, step, to_kohya, fmt, dtype))


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

def save_checkpoint(run, step, weights, optimizer, scheduler, config, to_kohya=None, ema=None):
    """Writes the resume state (tensors, then JSON) and then the LoRA file; returns its path.
    Weights that are not finite are refused before any file is written (NonFiniteWeights).
    `ema` (train.ema): (the EMA's state_dict, its weights by name), the LoRA file's weights."""
    file_weights = ema[1] if ema else weights
    lora_file = _lora_file(run.checkpoint(step), file_weights, config, step, to_kohya)  # checked first
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
    if ema:  # the average's own state to resume it, and its weights by name (the file's, in float32)
        data["ema"] = _split(ema[0], tensors, "ema")
        data["ema_lora"] = _split(dict(ema[1]), tensors, "ema_lora")
    with atomic_path(run.checkpoint_state(step)) as temporary:
        save_file(tensors, temporary, metadata={"format": STATE_FORMAT, "token": data["token"]})
    with atomic_path(run.checkpoint_state_json(step)) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f)
    return save_lora_file(run.checkpoint(step), *lora_file)


MAX_STATE_JSON = 64 << 20  # a real one is a few hundred KB; more is not ours, and not read whole


def _where(run, step):
    return (f"the resume state of step {step} ({run.checkpoint_state_json(step)} + "
            f"{os.path.basename(run.checkpoint_state(step))})")


def _short(text, limit=300):
    """A reason quoting a damaged file stays one readable line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _first_nonfinite(value, where):
    """The path of the first value of a joined state that is a tensor holding NaN or inf, a NaN
    number or an integer no training reaches, or None. (A plain inf can be a setting, Prodigy's
    growth_rate: _checked takes it only where this run has the same.)"""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return None if finite else where
    if isinstance(value, float):
        return None if not math.isnan(value) else where
    if isinstance(value, int) and not isinstance(value, bool):
        return None if abs(value) < LARGEST_INTEGER else where
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        found = _first_nonfinite(item, f"{where}/{key}")
        if found:
            return found
    return None


def load_checkpoint_state(run, step):
    """{"step", "lora", "optimizer", "scheduler"} (and with train.ema "ema", "ema_lora") of the step checkpoint `step`, tensors on the
    CPU. Raises StateError naming the files when they are missing, torn, mismatched, not ours or
    hold a value that is not finite. Never unpickles anything. Whether the state fits the model
    and optimizer is resume()'s check."""
    tensors_path, json_path = run.checkpoint_state(step), run.checkpoint_state_json(step)
    where = _where(run, step)
    try:
        with open(json_path, encoding="utf-8") as f:
            text = f.read(MAX_STATE_JSON + 1)
        if len(text) > MAX_STATE_JSON:
            raise ValueError(f"it is larger than {MAX_STATE_JSON >> 20} MiB")
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        with safe_open(tensors_path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("token") != data.get("token"):
                raise ValueError("its two files come from different saves")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        state = {key: _join(data[key], tensors) for key in STATE_KEYS if key in data or key in REQUIRED}
        if data.get("step") != step:
            raise ValueError(f"it says step {data.get('step')!r}")
        if not isinstance(state["lora"], dict) or not state["lora"]:
            raise ValueError("it holds no LoRA weights")
        nonfinite = _first_nonfinite(state, "")
        if nonfinite:
            raise ValueError(f"{nonfinite.lstrip('/')} holds NaN, inf or a number out of range")
    except FileNotFoundError as error:
        raise StateError(f"{where} is incomplete: {error.filename} is missing") from None
    except Exception as error:  # noqa: BLE001 - whatever a damaged file does, it is refused
        raise StateError(f"{where} cannot be loaded: {_short(error)}") from None
    return {"step": step, **state}


def _skipped(refused, found):
    """The warnings for the resume states `refused` [(step, why)], ending in what happens now."""
    then = (f"resuming from step {found[0]} instead." if found else
            "no checkpoint can be resumed, so training starts from step 0.")
    return [f"{why}; {then}" if isinstance(step, int) else why for step, why in refused]


def load_resume_state(run, below=None):
    """The newest step checkpoint (older than step `below`, when given) whose resume state loads:
    ((step, state), warnings), or (None, warnings) when there is none. A checkpoint whose state
    is refused (StateError) is skipped, with a warning naming it, and the one before it tried;
    step files of earlier versions (.state.pt, a pickle) are never loaded and are named too."""
    refused, found = [], None
    for step in reversed([s for s in run.checkpoints() if below is None or s < below]):
        if run.has_state(step):
            try:
                found = step, load_checkpoint_state(run, step)
                break
            except StateError as error:
                refused.append((step, str(error)))
        elif os.path.isfile(run.legacy_checkpoint_state(step)):
            refused.append((None, f"{run.legacy_checkpoint_state(step)} is a resume state of an "
                                  "earlier LoRA Lab (a pickle, which could run any code): it is not loaded."))
    return found, _skipped(refused, found)


# -- does a loaded state fit this model, optimizer and schedule? -----------------------------------

class NetworkMismatch(StateError):
    """The state's LoRA has other layers or another rank throughout: other network settings, not
    a damaged tensor."""


def _rank_only(saved, expected, key):
    """True when saved[key] differs from expected[key] only in the LoRA rank, the same rank as
    its pair (lora_A [rank, in, ...] with lora_B [out, rank, ...])."""
    axis, pair = (0, key.replace(".lora_A.", ".lora_B.")) if ".lora_A." in key else \
        (1, key.replace(".lora_B.", ".lora_A."))
    shape, other = list(saved[key].shape), saved.get(pair)
    if other is None or len(shape) != expected[key].dim() or len(shape) < 2:
        return False
    rank = shape[axis]
    shape[axis] = expected[key].shape[axis]
    return shape == list(expected[key].shape) and other.dim() >= 2 and other.shape[1 - axis] == rank


def _check_lora(saved, expected):
    """Raises NetworkMismatch when `saved` is a LoRA of other layers or another rank than this
    model's (`expected`, lora_weights' names), StateError when a tensor is damaged."""
    if not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise StateError("lora holds a value that is not a tensor")
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or extra:
        raise NetworkMismatch(_short(
            f"its LoRA covers other layers ({len(missing)} of this model's missing, e.g. "
            f"{(missing or ['none'])[0]}; {len(extra)} it has that this model has not, e.g. "
            f"{(extra or ['none'])[0]})"))
    for key in sorted(expected):
        if saved[key].dtype != expected[key].dtype:
            raise StateError(f"lora/{key} is {saved[key].dtype}, not {expected[key].dtype}")
    wrong = [key for key in sorted(expected) if saved[key].shape != expected[key].shape]
    if wrong and all(_rank_only(saved, expected, key) for key in wrong):
        ranks = lambda weights: sorted({v.shape[0] for k, v in weights.items() if ".lora_A." in k})
        raise NetworkMismatch(f"rank {ranks(saved)}, this config's {ranks(expected)}")
    if wrong:
        raise StateError(f"lora/{wrong[0]} has shape {list(saved[wrong[0]].shape)}, this model's "
                         f"is {list(expected[wrong[0]].shape)}")


def _checked(saved, expected, where, exact=False):
    """`saved` when it has the kind of `expected` (this run's own value): a tensor of the same
    shape and dtype, a number, string, boolean or None as `expected` is, a list or tuple of the
    same length, a dict whose entries are checked in turn. A dict's entries that only `saved`
    has are dropped and those it lacks take this run's value (other torch versions add or drop
    some), unless `exact`. Raises StateError naming `where` otherwise."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise StateError(f"{where} is not a tensor")
        if saved.shape != expected.shape or saved.dtype != expected.dtype:
            raise StateError(f"{where} is a {saved.dtype} tensor of shape {list(saved.shape)}, this "
                             f"run's is {expected.dtype} {list(expected.shape)}")
        return saved
    if isinstance(expected, dict):
        if not isinstance(saved, dict) or (exact and saved.keys() != expected.keys()):
            raise StateError(f"{where} does not hold the entries this run's does")
        return {k: _checked(saved[k], v, f"{where}/{k}") if k in saved else v for k, v in expected.items()}
    if isinstance(expected, (list, tuple)):
        if type(saved) is not type(expected) or len(saved) != len(expected):
            raise StateError(f"{where} is not a {type(expected).__name__} of {len(expected)} values")
        return type(expected)(_checked(s, e, f"{where}/{i}") for i, (s, e) in enumerate(zip(saved, expected)))
    number = (int, float)
    same = (isinstance(saved, number) and not isinstance(saved, bool)
            if isinstance(expected, number) and not isinstance(expected, bool)
            else type(saved) is type(expected))
    if same and isinstance(saved, float) and math.isinf(saved) and saved != expected:
        raise StateError(f"{where} is {saved}, where this run's is {expected}")
    if not same:
        raise StateError(f"{where} is {_short(repr(saved), 40)}, where this run has a {type(expected).__name__}")
    return saved


def _reference_optimizer_state(optimizer, optimizer_name):
    """The per-parameter state `optimizer` keeps: that of a copy of its parameters after one step
    (state tensors' shapes and dtypes follow the parameters: Adafactor factors matrices,
    bitsandbytes keeps small tensors in 32 bits)."""
    from .optimizers import make_optimizer  # imported here: it pulls in diffusers' schedules

    groups = [{"params": [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]}
              for group in optimizer.param_groups]
    probe = make_optimizer(optimizer_name, groups, 1e-4)
    for group in groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    probe.step()
    return probe.state_dict()["state"]


def _fitted_ema(state, ema):
    """The EMA part of `state` checked against this run's `ema` (None when train.ema is off)."""
    if not ema.on:
        return None
    if "ema" not in state:
        raise StateError("it holds no EMA of the LoRA weights (train.ema)")
    return _checked(state["ema"], ema.state_dict(), "ema", exact=True)


def _fitted(state, weights, optimizer, scheduler, optimizer_name):
    """The optimizer and scheduler parts of `state`, checked against this run's (see _checked);
    raises StateError or NetworkMismatch when the state does not fit."""
    _check_lora(state["lora"], weights)
    saved, live = state["optimizer"], optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise StateError("optimizer does not hold an optimizer's state")
    groups = _checked(saved.get("param_groups"), live["param_groups"], "optimizer/param_groups")
    for index, (group, own) in enumerate(zip(groups, live["param_groups"])):
        if group["params"] != own["params"]:  # they number the parameters the state is keyed by
            raise StateError(f"optimizer/param_groups/{index}/params are not this run's parameters")
    reference = _reference_optimizer_state(optimizer, optimizer_name)
    unknown = [key for key in saved["state"] if key not in reference]
    if unknown:
        raise StateError(_short(f"optimizer/state has {unknown[0]!r}, which is none of this run's "
                                f"{len(reference)} parameters"))
    per_parameter = {key: _checked(value, reference[key], f"optimizer/state/{key}", exact=True)
                     for key, value in saved["state"].items()}
    return ({"state": per_parameter, "param_groups": groups},
            _checked(state["scheduler"], scheduler.state_dict(), "scheduler"))


def resume(run, found, model, text_encoders, optimizer, scheduler, optimizer_name, ema):
    """Puts load_resume_state's `found` (step, state) on the model (its LoRA), optimizer and
    schedule, once it is checked against them: every tensor's shape and dtype, every plain
    value's type. A state that does not fit is skipped by name for the one before it; when none
    fits, training starts from step 0. Returns (the step resumed from or 0, warnings). Raises
    ResumeError when the LoRA was trained with other network settings (other layers or rank)."""
    weights, warnings = lora_weights(model, text_encoders), []
    while found is not None:
        step, state = found
        try:
            optimizer_state, scheduler_state = _fitted(state, weights, optimizer, scheduler, optimizer_name)
            ema_state = _fitted_ema(state, ema)
        except NetworkMismatch as error:
            raise ResumeError(f"{run.checkpoint(step)} was trained with other network settings "
                              f"({error}). Give this run another name, or set train.resume to "
                              "false to start a new run folder beside it.") from None
        except StateError as error:
            found, earlier = load_resume_state(run, below=step)
            warnings += _skipped([(step, f"{_where(run, step)} does not fit this run: {error}")], found)
            warnings += earlier
            continue
        load_lora_weights(model, state["lora"], text_encoders)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        ema.load_state_dict(ema_state)
        return step, warnings
    return 0, warnings
