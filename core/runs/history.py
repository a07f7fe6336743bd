"""The runs of an output folder, read back from their run folders (docs/training-guide.md, section 6: keep the
settings of every experiment and learn from earlier attempts)."""
import datetime
import json
import os
import shutil
from dataclasses import dataclass, field

from .. import UserError
from .folder import RunFolder


class RunNotFound(UserError, ValueError):
    """A run reference that names no run folder; the message says where it looked."""


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

    @property
    def date(self):
        """When the run was (last) started: its config.json is written at each start."""
        seconds = os.path.getmtime(os.path.join(self.path, "config.json"))
        return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")

    @property
    def model(self):
        model = self.config.get("model", {})
        return os.path.basename(os.path.normpath(model.get("path", "?"))) or model.get("path", "?")

    @property
    def steps(self):
        return self.config.get("train", {}).get("steps")

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
        """Steps that have sample images, oldest first."""
        folder = os.path.join(self.path, "samples")
        if not os.path.isdir(folder):
            return []
        return sorted(int(name) for name in os.listdir(folder) if name.isdigit())

    def sample_paths(self, step):
        """The sample images of one step, in prompt order (the trainer's LoRA at strength 1)."""
        folder = os.path.join(self.path, "samples", f"{step:09d}")
        return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                      if name.endswith("_s1.png"))


def read_run(path):
    """RunRecord of a run folder (one holding config.json)."""
    path = os.path.abspath(os.path.expanduser(path))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    # The folder names the run: a changed rerun of `name` lives in `name-2` with config name `name`.
    name = os.path.basename(path) or config.get("name")
    # kept apart from the settings, so `runs compare` shows each setting once
    identity, started_because = config.pop("identity", None), config.pop("started_because", None)
    run = RunFolder(os.path.dirname(path), os.path.basename(path))
    warnings = []
    if os.path.isfile(run.file("warnings.json")):
        with open(run.file("warnings.json"), encoding="utf-8") as f:
            warnings = json.load(f)
    metrics = run.read_metrics()
    return RunRecord(name, path, config, metrics, warnings, identity, run.metrics_problem, started_because)


def find_runs(output_dir):
    """Every run folder directly inside `output_dir`, oldest first."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if not os.path.isdir(output_dir):
        return []
    folders = [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))]
    runs = [read_run(folder) for folder in folders if os.path.isfile(os.path.join(folder, "config.json"))]
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
    return "\n".join(lines + ([""] + reasons if reasons else []))


def export_run(path, step, destination):
    """Copies one LoRA of a run (the final one when `step` is None, else that step checkpoint)
    with its config.json, metrics.jsonl, warnings.json, loss.png and samples (up to `step`) into
    the folder `destination`, which must be new or empty. Returns the copied paths."""
    path = os.path.abspath(os.path.expanduser(path))
    run = RunFolder(os.path.dirname(path), os.path.basename(path))
    lora = run.final_lora if step is None else run.checkpoint(step)
    if not os.path.isfile(lora):
        what = "no final LoRA (the run has not finished)" if step is None else f"no step {step} checkpoint"
        raise RunNotFound(f"{run.path} has {what}: {lora} does not exist. Its step checkpoints: "
                          f"{run.checkpoints() or 'none'}.")
    destination = os.path.abspath(os.path.expanduser(destination))
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise FileExistsError(f"{destination} exists and is not an empty folder: export writes a new folder")
    os.makedirs(destination, exist_ok=True)
    copied = []

    def copy(source, *target):
        target_path = os.path.join(destination, *target)
        os.makedirs(os.path.dirname(target_path), exist_ok=True)
        shutil.copyfile(source, target_path)
        copied.append(target_path)

    copy(lora, os.path.basename(lora))
    for name in ("config.json", "metrics.jsonl", "warnings.json", "loss.png"):
        if os.path.isfile(run.file(name)):
            copy(run.file(name), name)
    samples = os.path.join(run.path, "samples")
    if os.path.isdir(samples):
        for folder in sorted(os.listdir(samples)):
            if folder.isdigit() and (step is None or int(folder) <= step):
                for image in sorted(os.listdir(os.path.join(samples, folder))):
                    if os.path.isfile(os.path.join(samples, folder, image)):
                        copy(os.path.join(samples, folder, image), "samples", folder, image)
    return copied
