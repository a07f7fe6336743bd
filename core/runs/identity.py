"""One run folder, one training. A run's identity is the settings that change what it trains;
the same identity resumes its folder (or finds it finished), any change starts a new folder
beside it (<name>-2, <name>-3, ...) with a reason naming what changed, so an earlier run's
files and config.json are never touched by a later, different run.

In the identity (they change the trained weights):
  model.*      family, path, transformer_path, clip_l_path, t5_path, vae_path, dtype, quantize
  dataset.*    every key but folder and cache, plus dataset.fingerprint (the loop's
               dataset_stats.fingerprint: a hash of the images and captions as trained)
  network.*    every key; type and dora only when not a plain LoRA, lokr_* only with type
               lokr (a run from before they existed keeps its identity)
  train.*      every key but those in TRAIN_EXCLUDED
  save.format, save.dtype   (the saved LoRA files differ)

Left out, and why:
  train.resume   says whether to continue, not what is trained
  train.steps    more steps with everything else equal continue the same run from its newest
                 checkpoint. (Fewer steps than a run has trained already start a new folder:
                 its LoRA is not the one asked for.) Except with a decaying schedule
                 (train.lr_scheduler linear or cosine): there the learning rate of every step
                 depends on the total, so a changed total is a different training
  train.gradient_checkpointing   trades compute for memory; the same weights come out
  train.ema, train.ema_decay     while train.ema is off (on, they change the saved weights)
  dataset.folder a moved or renamed dataset with the same images and captions is the same data
                 (the fingerprint decides; without one the folder counts)
  dataset.cache  where latents are kept, not what they are
  dataset.mask_folder, alpha_mask, mask_min   while no mask is used
  save.*         but format and dtype: save_every, max_step_saves_to_keep, output_dir
  sample.*, logging.*, name, versions: what is looked at or logged, not what is trained
"""
import json
import os
import re

from ..io.atomic import TEMPORARY
from .folder import LIBRARY_TEMPORARY, LOCK_FILE, RunFolder

IDENTITY_KEY = "identity"
MODEL_KEYS = ("family", "path", "transformer_path", "clip_l_path", "t5_path", "text_encoder_path", "vae_path",
              "dtype", "quantize")
DATASET_EXCLUDED = ("folder", "cache")
TRAIN_EXCLUDED = ("resume", "steps", "gradient_checkpointing", "offload_blocks")  # memory, not math
EMA_KEYS = ("ema", "ema_decay")
MASK_KEYS = ("mask_folder", "alpha_mask", "mask_min")
STEP_DEPENDENT_SCHEDULES = ("linear", "cosine")
SAVE_KEYS = ("format", "dtype")


def _flat(prefix, section):
    return {f"{prefix}.{key}": value for key, value in sorted((section or {}).items())}


def _trained_network(network):
    """The network section less the adapter-type keys that do not change this adapter."""
    network = dict(network or {})
    kind, dora = network.pop("type", "lora"), network.pop("dora", False)
    lokr = {key: network.pop(key) for key in ("lokr_factor", "lokr_full_rank") if key in network}
    if kind != "lora":
        network["type"] = kind
    if dora:
        network["dora"] = True
    return {**network, **(lokr if kind == "lokr" else {})}


def run_identity(config):
    """{"train.lr": 0.0001, ...}: the dotted settings that define the training `config` describes
    (see the module docstring). JSON-plain values, so it compares equal after a round trip."""
    model, dataset = config.get("model") or {}, config.get("dataset") or {}
    train = config.get("train") or {}
    identity = {f"model.{key}": model.get(key) for key in MODEL_KEYS}
    fingerprint = (config.get("dataset_stats") or {}).get("fingerprint")
    excluded = DATASET_EXCLUDED if fingerprint else ("cache",)
    if not (dataset.get("mask_folder") or dataset.get("alpha_mask")):  # off: as before masks existed
        excluded = excluded + MASK_KEYS
    identity.update(_flat("dataset", {k: v for k, v in dataset.items() if k not in excluded}))
    identity["dataset.fingerprint"] = fingerprint
    identity.update(_flat("network", _trained_network(config.get("network"))))
    kept = {k: v for k, v in train.items() if k not in TRAIN_EXCLUDED}
    if not train.get("ema"):  # off, ema_decay changes nothing: the same run as before train.ema existed
        kept = {k: v for k, v in kept.items() if k not in EMA_KEYS}
    if train.get("lr_scheduler") in STEP_DEPENDENT_SCHEDULES:
        kept["steps"] = train.get("steps")
    identity.update(_flat("train", kept))
    identity.update({f"save.{key}": (config.get("save") or {}).get(key) for key in SAVE_KEYS})
    return json.loads(json.dumps(identity, default=str))


def stored_identity(run):
    """The identity recorded in a run folder's config.json (computed from its settings for run
    folders of earlier versions), or None when the folder holds no readable config.json."""
    config = run.read_config()
    if config is None:
        return None
    stored = config.get(IDENTITY_KEY)
    return stored if isinstance(stored, dict) else run_identity(config)


def _show(value):
    return json.dumps(value) if isinstance(value, (list, dict, str)) or value is None else str(value)


def identity_changes(old, new):
    """["train.lr 0.0004 -> 0.001", ...]: the identity keys whose values differ."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key} {_show(old.get(key))} -> {_show(new.get(key))}")
    return changes


def trained_steps(run):
    """How far a run folder has trained: its newest step checkpoint, or its config's train.steps
    when its final LoRA is there."""
    trained = max(run.checkpoints() or [0])
    if run.has_final_lora():
        steps = ((run.read_config() or {}).get("train") or {}).get("steps")
        trained = max(trained, steps if isinstance(steps, int) else 0)
    return trained


def _existing(output_dir, name):
    """(run folders <name> and <name>-N that hold a training's files, by number (gaps allowed: a
    deleted <name>-2 does not hide <name>-3); {name: what} of those taken by something else)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:-([2-9]|[1-9]\d+))?$")
    folder = os.path.abspath(os.path.expanduser(output_dir))
    found, foreign = [], {}
    for entry in (os.listdir(folder) if os.path.isdir(folder) else []):
        match = pattern.match(entry)
        if not match:
            continue
        run = RunFolder(output_dir, entry)
        others = _foreign_entries(run.path)
        if others is None and _holds_a_run(run):
            found.append((int(match.group(1) or 1), run))
        elif others:
            foreign[entry] = others
    return [run for _, run in sorted(found, key=lambda pair: pair[0])], foreign


def _holds_a_run(run):
    """Whether a folder holds a training's files. One with none of them can be used for a new
    run: a run that stopped before writing its config, or one that only cached latents."""
    return os.path.isfile(run.config_path) or os.path.isfile(run.final_lora) or bool(run.checkpoints())


# what a run writes before its config.json: a folder holding only these (or nothing) is reused
BEFORE_CONFIG = (LOCK_FILE, "cache")


def _foreign_entries(path):
    """Why the folder at `path` is not LoRA Lab's to write into, or None: it is a link or no
    folder, or it holds no run but files of its own (their names, a few)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return "it is a link" if os.path.islink(path) else "it is not a folder"
    if _holds_a_run(RunFolder(*os.path.split(path))):
        return None
    others = sorted(name for name in os.listdir(path) if name not in BEFORE_CONFIG
                    and not TEMPORARY.match(name) and not LIBRARY_TEMPORARY.match(name))
    return f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" if others else None


def choose_run_folder(output_dir, name, config, resume=None):
    """(RunFolder, reason or None) for the training `config` (resolved, with train.steps and
    dataset_stats.fingerprint filled in) describes.

    resume=True: the first of <name>, <name>-2, ... whose stored identity equals this config's and
    that has not trained past train.steps (resume it, or it is already finished); else the first
    free one, started fresh, with a reason naming the settings that differ from the newest earlier
    run of that name (or saying that the same settings trained past train.steps).
    resume=False: <name> when free, else the first free <name>-N, with a reason.
    resume=None: config's train.resume.

    Reads only, creates nothing: every process of a multi-process run may call it before the main
    one creates the folder. The returned RunFolder carries the identity and the reason, which its
    write_config stores in config.json."""
    if resume is None:
        resume = (config.get("train") or {}).get("resume", True)
    identity = run_identity(config)
    existing, foreign = _existing(output_dir, name)
    identities = [(run, stored_identity(run)) for run in existing]
    steps = (config.get("train") or {}).get("steps")
    past = None  # (run, how far it trained) of a same-settings run that went past `steps`
    if resume:
        for run, theirs in identities:
            if theirs == identity:
                trained = trained_steps(run)
                if steps is None or trained <= steps:
                    run.identity = identity
                    return run, None
                past = past or (run, trained)
    taken = {run.name for run in existing} | set(foreign)
    number = 1
    while (name if number == 1 else f"{name}-{number}") in taken:
        number += 1
    run = RunFolder(output_dir, name if number == 1 else f"{name}-{number}")
    readable = [(other, theirs) for other, theirs in identities if theirs is not None]
    if not existing:
        reason = None if name not in foreign else (
            f"{os.path.join(os.path.abspath(os.path.expanduser(output_dir)), name)} is not a LoRA Lab "
            f"run folder ({foreign[name]}): it is left as it is")
    elif not resume:
        reason = (f"train.resume is false: a fresh run in {run.name}; "
                  f"{', '.join(other.name for other in existing)} keep their earlier runs")
    elif past:
        reason = (f"train.steps {steps}: run {past[0].name}, with the same settings, has trained "
                  f"{past[1]} steps already, so its LoRA is not the one asked for")
    elif not readable:
        reason = f"{existing[-1].name} holds another run's files but no readable config.json"
    else:
        newest, theirs = readable[-1]
        changes = identity_changes(theirs, identity)
        reason = f"settings differ from run {newest.name}: " + "; ".join(changes)
    run.identity = identity
    run.started_because = reason
    return run, reason
