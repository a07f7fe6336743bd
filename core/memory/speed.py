"""What train.offload_blocks costs in step time, as an estimate (docs/measurements.md, "Offloading
and the fit per card").
The assumptions are these three numbers, stated once; benchmarks/gpu_memory.py measures the real
figures on a GPU.

Each offloaded block is copied to the device twice a step: before its forward and before its
backward (frozen weights are never copied back). A copy runs on a side stream while the block
before it computes, so a block costs max(its compute, its copy) instead of its compute. An
offloaded block is also recomputed in backward (as with gradient checkpointing), which costs one
more forward of it when checkpointing is off.

Compute per block: 2 FLOPs per weight per token, and attention's 4 x tokens x hidden; backward is
two forwards (the usual rule: gradients of the inputs and, through attention, of its scores),
recomputation one more. The slowdown is against the same quantize mode with nothing recomputed
and nothing offloaded: what checkpointing and offloading cost together. Slower cards than ASSUMED_CARD compute longer per block and
so hide the copies better; a PCIe x8 slot halves HOST_TO_DEVICE."""
from .estimate import block_bytes, memory_model

ASSUMED_CARD = "an RTX 4090-class GPU in a PCIe 4.0 x16 slot"
FLOPS = 80e12            # bf16 FLOP/s a training step reaches: about half the 4090's dense peak
HOST_TO_DEVICE = 25e9    # bytes/s from pinned CPU memory: PCIe 4.0 x16 (32 GB/s raw)


def assumptions():
    return (f"{ASSUMED_CARD}: {FLOPS / 1e12:.0f} TFLOP/s reached, {HOST_TO_DEVICE / 1e9:.0f} GB/s "
            "host to device, copies overlapped with the block before")


def step_time(config, shape, quantize, checkpointing, resolution, offload_blocks):
    """Estimated seconds of the blocks' share of one step with the last `offload_blocks` blocks
    offloaded (see above)."""
    memory = memory_model(config)
    blocks = memory.block_parameters(shape)
    offload_blocks = min(offload_blocks, len(blocks))
    tokens = memory.tokens(shape, resolution)
    attention = 4 * tokens * shape["hidden"]
    forward = [config["train"]["batch_size"] * tokens * (2 * weights + attention) / FLOPS for weights in blocks]
    copies = [size / HOST_TO_DEVICE for size in block_bytes(memory, shape, quantize, config["model"]["dtype"])]
    seconds = sum(forward) * (4 if checkpointing else 3)  # forward, backward (+ the recompute)
    for compute, copy in zip(forward[len(blocks) - offload_blocks:], copies[len(blocks) - offload_blocks:]):
        if not checkpointing:
            seconds += compute                       # recomputed in backward
        seconds += max(0.0, copy - compute)          # forward: the copy against one forward
        seconds += max(0.0, copy - 3 * compute)      # backward: against recompute + backward
    return seconds


def slowdown(config, shape, quantize, checkpointing, resolution, offload_blocks):
    """The step's estimated extra time with these settings, as a fraction of the same quantize
    mode's step with nothing recomputed and every block resident."""
    fastest = step_time(config, shape, quantize, False, resolution, 0)
    return step_time(config, shape, quantize, checkpointing, resolution, offload_blocks) / fastest - 1
