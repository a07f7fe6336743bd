"""What to say when the accelerator runs out of memory: the estimate for these settings and the
changes that lower it, in the order that costs the LoRA least: quantize and gradient
checkpointing first, as core.coach.fit suggests before a run."""
from .memory import estimate_memory, gigabytes


def out_of_memory_advice(config, error):
    model, train, network = config["model"], config["train"], config["network"]
    lines = [f"the GPU ran out of memory ({str(error).splitlines()[0][:200]})."]
    try:
        estimate = estimate_memory(config)
        lines.append(f"These settings need about {gigabytes(estimate.total_bytes)} "
                     "before activations.")
    except (OSError, KeyError, ValueError):
        pass  # the advice below stands without an estimate
    tries = []
    if model["quantize"] in ("auto", "none"):
        tries.append("set model.quantize to fp8 (1-byte frozen transformer, computed in bf16), "
                     "or nf4 on a CUDA GPU (about half of fp8)")
    elif model["quantize"] in ("fp8", "int8"):
        tries.append("set model.quantize to nf4 (4-bit frozen transformer, bitsandbytes on CUDA)")
    if train["gradient_checkpointing"] is not True:
        tries.append("set train.gradient_checkpointing to true (much smaller activations)")
    if max(config["dataset"]["resolution"]) > 512:
        tries.append(f"train at a lower dataset.resolution (now {config['dataset']['resolution']}; 512 first)")
    if train["batch_size"] > 1:
        tries.append(f"use train.batch_size 1 (now {train['batch_size']}; the guide recommends 1)")
    if train["optimizer"] not in ("adamw8bit", "adafactor", "lion"):
        tries.append(f"use train.optimizer adamw8bit (now {train['optimizer']})")
    if network["linear"] > 16:
        tries.append(f"lower network.linear (now {network['linear']}; 16 is the guide's default)")
    if model["dtype"] == "fp32":
        tries.append("load the model in bf16 (model.dtype)")
    lines.append("Try, in this order: " + "; ".join(tries) + "." if tries else
                 "These are already the leanest settings: a GPU with more memory is needed.")
    lines.append("Run the same command again afterwards: training resumes from the newest checkpoint.")
    return " ".join(lines)
