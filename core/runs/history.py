"""The runs of an output folder, read back from their run folders (docs/training-guide.md, section 6: keep the
settings of every experiment and learn from earlier attempts)."""
import datetime
import os
import shutil
from dataclasses import dataclass, field

from .. import UserError
from ..io import UnreadableFile, open_regular
from .folder import RunFolder


class RunNotFound(UserError, ValueError):
    """A run reference that names no run folder; the message says where it looked."""


class DamagedRun(UserError, ValueError):
    """A run folder whose config.json cannot be read as a run's: "damaged: <file>: <why>"."""


@dataclass
class RunRecord:
    name: str
    path: str
    config: dict = field(repr=False)
    metrics: list = field(repr=False)
    warnings: list = field(repr=False)
    identity: dict = field(repr=False, default=None)  # the settings that define the training
    metrics_problem: str = field(repr=False, default=None)  # lines of metrics.jsonl dropped, or None
    # why this run got its own folder (settings changed, or train.resume false), or None
    started_because: str = field(repr=False, default=None)
    problems: list = field(repr=False, default_factory=list)  # "damaged: ..." files skipped

    @property
    def date(self):
        """When the run was (last) started: its config.json is written at each start."""
        seconds = os.path.getmtime(os.path.join(self.path, "config.json"))
        return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")

    @property
    def model(self):
        model = self.config.get("model") or {}  # a folder, else the single file trained from
        path = model.get("path") or model.get("transformer_path") or model.get("checkpoint_path") or "?"
        return os.path.basename(os.path.normpath(path)) or path

    @property
    def steps(self):
        return (self.config.get("train") or {}).get("steps")

    @property
    def last_step(self):
        return self.metrics[-1]["step"] if self.metrics else 0

    def curve(self):
        return [(m["step"], m["loss"]) for m in self.metrics if isinstance(m.get("loss"), (int, float))]

    @property
    def final_loss(self):
        curve = self.curve()
        return curve[-1][1] if curve else None

    @property
    def best_loss(self):
        losses = [loss for _, loss in self.curve() if loss == loss]  # NaN is never the best
        return min(losses) if losses else None

    def sample_steps(self):
        """Steps that have sample images, oldest first (links are not followed)."""
        return sorted(int(entry.name) for entry in _folders(os.path.join(self.path, "samples"))
                      if entry.name.isdigit())

    def sample_paths(self, step):
        """The sample images of one step, in prompt order (the trainer's LoRA at strength 1)."""
        folder = os.path.join(self.path, "samples", f"{step:09d}")
        return sorted(entry.path for entry in _files(folder) if entry.name.endswith("_s1.png"))


def _entries(folder):
    """The entries of a folder that is no link, [] when missing."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _folders(folder):
    return [entry for entry in _entries(folder) if entry.is_dir(follow_symlinks=False)]


def _files(folder):
    return [entry for entry in _entries(folder) if entry.is_file(follow_symlinks=False)]


def read_run(path):
    """RunRecord of a run folder (one holding config.json). DamagedRun when its config.json is
    not a run's; a damaged warnings.json or metrics line is skipped and named in `problems`."""
    path = os.path.abspath(os.path.expanduser(path))
    run = RunFolder(os.path.dirname(path), os.path.basename(path))
    config = run.read_config()
    if config is None:
        raise DamagedRun(run.problems[0] if run.problems else f"{run.config_path} is missing")
    # The folder names the run: a changed rerun of `name` lives in `name-2` with config name `name`.
    name = os.path.basename(path) or config.get("name")
    # kept apart from the settings, so `runs compare` shows each setting once
    identity, started_because = config.pop("identity", None), config.pop("started_because", None)
    warnings = run.read_warnings()
    metrics = run.read_metrics()
    problems = run.problems + ([run.metrics_problem] if run.metrics_problem else [])
    return RunRecord(name, path, config, metrics, warnings, identity, run.metrics_problem,
                     started_because, problems)


def find_runs(output_dir, skipped=None):
    """Every run folder directly inside `output_dir`, oldest first; a damaged one is left out
    and its reason appended to `skipped` (a list) when given."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    runs = []
    for entry in _folders(output_dir):
        if os.path.lexists(os.path.join(entry.path, "config.json")):
            try:
                runs.append(read_run(entry.path))
            except DamagedRun as error:
                if skipped is not None:
                    skipped.append(str(error))
    return sorted(runs, key=lambda run: os.path.getmtime(os.path.join(run.path, "config.json")))


def locate_run(reference, output_dir="output"):
    """The folder of a run given as a path to its folder or as a name inside `output_dir`."""
    for candidate in (reference, os.path.join(output_dir, reference)):
        if os.path.isfile(os.path.join(os.path.expanduser(candidate), "config.json")):
            return os.path.abspath(os.path.expanduser(candidate))
    raise RunNotFound(f"no run folder {reference!r}: neither {os.path.abspath(reference)} nor "
                      f"{os.path.abspath(os.path.join(output_dir, reference))} holds a config.json. "
                      "`loralab runs list --output-dir DIR` lists the runs.")


def format_loss(value):
    return "-" if value is None else f"{value:.4f}"


def runs_table(runs):
    """The plain-text table of `loralab runs list`."""
    header = ("name", "date", "model", "steps", "final loss", "best loss", "warnings")
    rows = [(run.name, run.date, run.model, f"{run.last_step}/{run.steps}", format_loss(run.final_loss),
             format_loss(run.best_loss), str(len(run.warnings))) for run in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    reasons = [f"{run.name}: started because {run.started_because}" for run in runs if run.started_because]
    problems = [problem for run in runs for problem in run.problems]
    return "\n".join(lines + ([""] + reasons if reasons else []) + problems)


def export_run(path, step, destination, skipped=None):
    """Copies one LoRA of a run (the final one when `step` is None, else that step checkpoint)
    with its config.json, metrics.jsonl, warnings.json, loss.png and samples (up to `step`) into
    the folder `destination`, which must be new or empty. Returns the copied paths. A link (or
    anything but a regular file) is never copied: its name goes to `skipped`, when given."""
    path = os.path.abspath(os.path.expanduser(path))
    run = RunFolder(os.path.dirname(path), os.path.basename(path))
    lora = run.final_lora if step is None else run.checkpoint(step)
    if os.path.islink(lora):
        raise RunNotFound(f"{lora} is a link, not a LoRA file of the run: it is not exported")
    if not os.path.isfile(lora):
        what = "no final LoRA (the run has not finished)" if step is None else f"no step {step} checkpoint"
        raise RunNotFound(f"{run.path} has {what}: {lora} does not exist. Its step checkpoints: "
                          f"{run.checkpoints() or 'none'}.")
    destination = os.path.abspath(os.path.expanduser(destination))
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise FileExistsError(f"{destination} exists and is not an empty folder: export writes a new folder")
    os.makedirs(destination, exist_ok=True)
    copied, skipped = [], [] if skipped is None else skipped

    def copy(source, *target):
        target_path = os.path.join(destination, *target)
        try:
            with open_regular(source) as reader:  # never through a link
                os.makedirs(os.path.dirname(target_path), exist_ok=True)
                with open(target_path, "wb") as writer:
                    shutil.copyfileobj(reader, writer)
        except UnreadableFile:
            skipped.append(os.path.relpath(source, run.path))
            return
        copied.append(target_path)

    copy(lora, os.path.basename(lora))
    for name in ("config.json", "metrics.jsonl", "warnings.json", "loss.png"):
        if os.path.lexists(run.file(name)):
            copy(run.file(name), name)
    samples = os.path.join(run.path, "samples")
    if os.path.islink(samples):
        skipped.append("samples")
    for folder in _entries(samples):
        if not folder.is_dir(follow_symlinks=False):
            skipped.append(os.path.relpath(folder.path, run.path))
        elif folder.name.isdigit() and (step is None or int(folder.name) <= step):
            for image in _entries(folder.path):
                copy(image.path, "samples", folder.name, image.name)
    return copied
