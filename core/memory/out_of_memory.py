"""What to say when the accelerator runs out of memory: the estimate for these settings and the
changes that lower it, in lower.py's one order (the same that auto and the fit follow before a
run), each with the estimated peak after it."""
from .estimate import CUDA_ONLY, config_shape, gigabytes, memory_model
from .fit import lowered, peak_of
from .lower import leaner_steps


def out_of_memory_advice(config, error):
    lines = [f"the GPU ran out of memory ({str(error).splitlines()[0][:200]})."]
    try:
        shape = config_shape(config)
        lines.append(f"These settings need about {gigabytes(peak_of(config, shape))} by the estimate.")
        steps = [f"{change} (about {gigabytes(peak)})" for change, _, peak in lowered(config, shape=shape)]
    except (OSError, KeyError, ValueError, NotImplementedError):  # no estimate: the order stands alone
        steps = [change for change, _ in leaner_steps(config, memory_model(config).quantize_modes, "cuda", CUDA_ONLY)]
    lines.append("Try, in this order: " + "; ".join(f"set {step}" for step in steps) + "." if steps else
                 "These are already the leanest settings: a GPU with more memory is needed.")
    lines.append("Run the same command again afterwards: training resumes from the newest checkpoint.")
    return " ".join(lines)
