"""What to lower when memory runs short: ONE ordered list, what costs least first. Before a run,
`auto` (fit.py) walks it until the estimate fits and keeps the cheapest settings that fit; the
message when nothing fits applies it in the same order; after an out-of-memory it is the advice.

Cost is first what a change does to the LoRA, then the step time and host memory it costs. By
speed alone fp8 would come first; checkpointing comes before it because it leaves the LoRA
exactly as it is for a bounded cost; where checkpointing alone is not enough and fp8 alone is,
auto turns checkpointing off again.

1. train.gradient_checkpointing: activations recomputed in backward: about a third more compute,
   the LoRA exactly the same. First, because it saves the most at a known, bounded cost.
2. model.quantize to a one-byte mode (fp8; int8 only where it saves more than the mode before):
   the frozen base stored in 8 bits with a scale per tensor or row, computed in bf16. Half the
   weights' memory for no speed, and the LoRA trains as every peer trains these models (musubi-
   tuner's fp8_base, ai-toolkit's and OneTrainer's fp8 presets). Before offloading, because
   offloading costs speed that the overlap may not hide, and pinned CPU memory for every block
   offloaded (Qwen-Image's 60 bf16 blocks are 38 GiB of host RAM; in fp8, half).
3. train.offload_blocks: as many blocks as needed (fit.py finds the fewest) live in CPU memory
   and visit the device for their forward and backward. Only speed: the copies that the
   compute does not hide (speed.py estimates them) and the recompute of those blocks; never the
   LoRA. Before nf4, which changes what the LoRA learns against, as musubi-tuner and sd-scripts
   advise fp8 with blocks_to_swap rather than a 4-bit base on 12 GB.
4. model.quantize to the remaining modes (nf4: half a byte per weight): the base the LoRA learns
   against differs from the one it is used with; slower per call (dequantization).
5. train.batch_size 1, train.optimizer adamw8bit, model.dtype bf16: back to the guide's
   defaults, which already are the lean ones.
6. dataset.resolution down to 1024, 768, 512: the LoRA learns less fine detail.
7. network.linear down to 16, 8, 4: the LoRA holds less.
"""
from .estimate import QUANTIZED_BYTES

LEAN_OPTIMIZERS = ("adamw8bit", "adafactor", "lion")
RESOLUTIONS = (1024, 768, 512)
RANKS = (16, 8, 4)


def leaner_steps(config, quantize_modes, device_type="cuda", cuda_only=(), blocks=0):
    """[(description, {(section, key): value})] in the order above, each on top of the ones
    before, from `config`'s settings ("auto" counts as the least lean choice). `blocks`: the
    trainable model's block count (0: no offloading step); its step offloads them all, fit.py
    lowers it to the fewest that fit."""
    model, train, network = config["model"], config["train"], config["network"]
    steps = []
    if train["gradient_checkpointing"] is not True:
        steps.append(("train.gradient_checkpointing true", {("train", "gradient_checkpointing"): True}))
    modes = [mode for mode in quantize_modes if device_type == "cuda" or mode not in cuda_only]
    current = model["quantize"] if model["quantize"] in modes else modes[0]
    leaner = modes[modes.index(current) + 1:]
    one_byte = [mode for mode in leaner if QUANTIZED_BYTES[mode] >= 1]
    for mode in one_byte:
        if QUANTIZED_BYTES[mode] < QUANTIZED_BYTES.get(current, 2):  # int8 after fp8 saves nothing
            steps.append((f"model.quantize {mode}", {("model", "quantize"): mode}))
            current = mode
    offloaded = train.get("offload_blocks", 0)
    if blocks and (offloaded == "auto" or offloaded < blocks):
        steps.append((f"train.offload_blocks {blocks}", {("train", "offload_blocks"): blocks}))
    for mode in leaner:
        if mode not in one_byte:
            steps.append((f"model.quantize {mode}", {("model", "quantize"): mode}))
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
