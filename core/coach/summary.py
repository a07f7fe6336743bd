"""The plain-text summary of a training run (TrainLoRA's STRING output, the CLI's last words)."""
import json
import os

from ..demo.score import summary_lines as demo_lines
from .run_plan import arithmetic, guide_steps


def _config_value(run_folder, key):
    try:
        with open(os.path.join(run_folder, "config.json"), encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _plan_line(run_folder):
    """The run plan the trainer wrote into config.json (coach/run_plan.py), as `loralab plan` says it."""
    numbers = _config_value(run_folder, "plan")
    try:
        return f"plan: {arithmetic(numbers)} ({guide_steps(numbers)})"
    except (KeyError, TypeError, ValueError):
        return None


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
