"""What to lower when memory runs short: ONE ordered list, the change that costs the LoRA least
first. Before a run (auto, and the message when nothing fits) the changes are applied one after
another until the estimate fits; after an out-of-memory they are the advice, in the same order.

1. model.quantize, one mode at a time (the family's modes; bitsandbytes' only on CUDA): the
   frozen base's weights are stored smaller and computed in bf16; the LoRA trains the same.
2. train.gradient_checkpointing: activations recomputed in backward; slower, nothing lost.
3. train.batch_size 1, train.optimizer adamw8bit, model.dtype bf16: back to the guide's
   defaults, which already are the lean ones.
4. dataset.resolution down to 1024, 768, 512: the LoRA learns less fine detail.
5. network.linear down to 16, 8, 4: the LoRA holds less."""
LEAN_OPTIMIZERS = ("adamw8bit", "adafactor", "lion")
RESOLUTIONS = (1024, 768, 512)
RANKS = (16, 8, 4)


def leaner_steps(config, quantize_modes, device_type="cuda", cuda_only=()):
    """[(description, {(section, key): value})] in the order above, each on top of the ones
    before, from `config`'s settings ("auto" counts as the least lean choice)."""
    model, train, network = config["model"], config["train"], config["network"]
    steps = []
    modes = [mode for mode in quantize_modes if device_type == "cuda" or mode not in cuda_only]
    current = model["quantize"] if model["quantize"] in modes else modes[0]
    for mode in modes[modes.index(current) + 1:]:
        steps.append((f"model.quantize {mode}", {("model", "quantize"): mode}))
    if train["gradient_checkpointing"] is not True:
        steps.append(("train.gradient_checkpointing true", {("train", "gradient_checkpointing"): True}))
    if train["batch_size"] > 1:
        steps.append(("train.batch_size 1", {("train", "batch_size"): 1}))
    if train["optimizer"] not in LEAN_OPTIMIZERS:
        steps.append(("train.optimizer adamw8bit", {("train", "optimizer"): "adamw8bit"}))
    if model["dtype"] == "fp32":
        steps.append(("model.dtype bf16", {("model", "dtype"): "bf16"}))
    resolutions = sorted(config["dataset"]["resolution"])
    for low in RESOLUTIONS:
        if resolutions[-1] > low:
            resolutions = [r for r in resolutions if r <= low] or [low]
            steps.append((f"dataset.resolution {resolutions}", {("dataset", "resolution"): resolutions}))
    for rank in RANKS:
        if network["linear"] > rank:
            steps.append((f"network.linear {rank}", {("network", "linear"): rank}))
    return steps


def with_changes(config, changes):
    """A copy of config with (section, key) -> value changes."""
    copy = {section: dict(values) if isinstance(values, dict) else values
            for section, values in config.items()}
    for (section, key), value in changes.items():
        copy[section][key] = value
    return copy
