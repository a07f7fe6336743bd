"""Compare runs (docs/training-guide.md, section 6: "compare between settings; change one parameter at a
time"): the settings that differ, the loss curves on one plot, the samples side by side."""
import json
from dataclasses import dataclass, field

from PIL import Image

from ..sampling.grid import make_grid
from .history import format_loss, read_run
from .plot import loss_plot

SKIPPED_KEYS = ("name",)   # always differs, and each run is labelled by it anyway
MAX_SAMPLE_STEPS = 4       # rows of the sample image: a few steps spread over the run


def flatten(config, prefix=""):
    """{"train.lr": 0.0001, ...}: nested settings as dotted keys (lists kept whole)."""
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def setting_differences(configs):
    """[(dotted key, [value per config])] for every setting that is not the same in all."""
    flat = [flatten(config) for config in configs]
    keys = sorted(set().union(*flat))
    missing = object()
    differences = []
    for key in keys:
        if key in SKIPPED_KEYS:
            continue
        values = [f.get(key, missing) for f in flat]
        if any(json.dumps(v, default=str) != json.dumps(values[0], default=str) for v in values):
            differences.append((key, [None if v is missing else v for v in values]))
    return differences


def _labels(runs):
    """Run names, made unique when two runs share one (same name, different output folders)."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else f"{name} ({index + 1})" for index, name in enumerate(names)]


def _spread(steps, most):
    if len(steps) <= most:
        return steps
    return [steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)]


def _open(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def sample_rows(runs):
    """(rows, row labels): a row per (step, prompt) at steps every run sampled (a few, spread),
    plus each run's last samples when those steps differ; each row holds one image per run."""
    all_steps = [run.sample_steps() for run in runs]
    if not all(all_steps):
        return [], []
    common = sorted(set.intersection(*map(set, all_steps)))
    chosen = [(f"step {step}", [step] * len(runs)) for step in _spread(common, MAX_SAMPLE_STEPS)]
    last = [steps[-1] for steps in all_steps]
    if not common or any(step != common[-1] for step in last):
        chosen.append(("last (" + ", ".join(map(str, last)) + ")", last))
    prompts = runs[0].config.get("sample", {}).get("prompts", [])
    rows, row_labels = [], []
    for label, steps in chosen:
        paths = [run.sample_paths(step) for run, step in zip(runs, steps)]
        for index in range(min(len(p) for p in paths)):
            rows.append([_open(p[index]) for p in paths])
            prompt = prompts[index] if index < len(prompts) else f"prompt {index + 1}"
            row_labels.append(f"{label}: {prompt}")
    return rows, row_labels


def samples_side_by_side(runs, labels):
    """One image, a column per run (see sample_rows); None when a run has no samples."""
    rows, row_labels = sample_rows(runs)
    return make_grid(rows, row_labels, labels, title="samples by run") if rows else None


@dataclass
class Comparison:
    runs: list
    labels: list
    differences: list
    loss_image: object = field(repr=False)
    samples_image: object = field(repr=False)

    def text(self):
        lines = ["runs: " + ", ".join(f"{label} ({run.path})" for label, run in zip(self.labels, self.runs))]
        if not self.differences:
            lines.append("settings: identical")
        else:
            lines.append("settings that differ:")
            for key, values in self.differences:
                shown = "; ".join(f"{label}: {json.dumps(value, default=str)}"
                                  for label, value in zip(self.labels, values))
                lines.append(f"  {key}: {shown}")
        for label, run in zip(self.labels, self.runs):
            lines.append(f"{label}: step {run.last_step}/{run.steps}, final loss "
                         f"{format_loss(run.final_loss)}, best {format_loss(run.best_loss)}, "
                         f"{len(run.warnings)} warning(s)")
            lines += [f"  - {warning}" for warning in run.warnings]
            lines += [f"  {problem}" for problem in run.problems]
        return "\n".join(lines)


def compare_runs(paths):
    """Comparison of the run folders at `paths` (two or more)."""
    runs = [read_run(path) for path in paths]
    labels = _labels(runs)
    configs = [run.config for run in runs]
    curves = {label: run.curve() for label, run in zip(labels, runs)}
    return Comparison(runs, labels, setting_differences(configs),
                      loss_plot(curves, title="loss by run"), samples_side_by_side(runs, labels))
