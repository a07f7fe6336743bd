"""The plain-text summary of a training run (TrainLoRA's STRING output, the CLI's last words)."""
import json
import os

from ..config import epochs, steps_per_epoch
from ..dataset.batches import regularization_entries
from .advice import step_band_text
from .demo_score import summary_lines as demo_lines


def _config_value(run_folder, key):
    try:
        with open(os.path.join(run_folder, "config.json"), encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _plan_line(run_folder):
    """Images, steps per epoch and epochs by the guide's formulas, from the run's config.json."""
    try:
        with open(os.path.join(run_folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        images = config["dataset_stats"]["images"]
        repeats, batch = config["dataset"]["repeats"], config["train"]["batch_size"]
        steps = config["train"]["steps"]
        others = config["dataset_stats"].get("regularization_images", 0)
        ratio = config["dataset"].get("regularization_ratio", 1.0) if others else 0
    except (OSError, ValueError, KeyError, TypeError):
        return None
    entries = images * repeats
    entries += regularization_entries(entries, ratio)  # as the trainer's BatchPlan counts them
    return (f"plan: {images} images x {repeats} repeats"
            + (f", and {ratio:g} per image of the {others} regularization images," if others else "")
            + f" / batch {batch} = {steps_per_epoch(entries, 1, batch)} steps per epoch; {steps} steps = "
            f"{epochs(steps, entries, 1, batch):.4g} epochs (the guide: {step_band_text(images)} steps "
            f"for {images} images" + (f", times {1 + ratio:g} with the regularization images)" if others else ")"))


def run_summary(result, metrics):
    """result: core.trainer.TrainResult; metrics: the run's metrics.jsonl lines."""
    lines = [f"{result.status}: step {result.step} of {result.steps}",
             f"LoRA: {result.lora_path}", f"run folder: {result.run_folder}"]
    lines += [f"memory: {note}" for note in getattr(result, "memory", [])]
    why = _config_value(result.run_folder, "started_because")
    if why:
        lines.append(f"a new run folder, because {why}")
    plan = _plan_line(result.run_folder)
    if plan:
        lines.append(plan)
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    if losses:
        lines.append(f"loss: first {losses[0]:.4f}, final {losses[-1]:.4f}, best {min(losses):.4f}")
    if metrics:
        last = metrics[-1]
        lines.append(f"speed: {last['seconds_per_step']:.3f} s/step; peak RAM {last['cpu_peak_mb']:.0f} MiB"
                     + (f", peak GPU {last['gpu_peak_mb']:.0f} MiB" if last.get("gpu_peak_mb") else ""))
    lines += demo_lines(result.run_folder)
    if result.warnings:
        lines.append(f"{len(result.warnings)} warning(s):")
        lines += [f"  - {w}" for w in result.warnings]
    else:
        lines.append("no warnings: the loss and the samples showed none of the guide's signs of problems")
    return "\n".join(lines)
