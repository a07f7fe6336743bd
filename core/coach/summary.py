"""The plain-text summary of a training run (TrainLoRA's STRING output, the CLI's last words)."""


def run_summary(result, metrics):
    """result: core.trainer.TrainResult; metrics: the run's metrics.jsonl lines."""
    lines = [f"{result.status}: step {result.step} of {result.steps}",
             f"LoRA: {result.lora_path}", f"run folder: {result.run_folder}"]
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    if losses:
        lines.append(f"loss: first {losses[0]:.4f}, final {losses[-1]:.4f}, best {min(losses):.4f}")
    if metrics:
        last = metrics[-1]
        lines.append(f"speed: {last['seconds_per_step']:.3f} s/step; peak RAM {last['cpu_peak_mb']:.0f} MiB"
                     + (f", peak GPU {last['gpu_peak_mb']:.0f} MiB" if last.get("gpu_peak_mb") else ""))
    if result.warnings:
        lines.append(f"{len(result.warnings)} warning(s):")
        lines += [f"  - {w}" for w in result.warnings]
    else:
        lines.append("no warnings")
    return "\n".join(lines)
