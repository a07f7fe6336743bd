"""Benchmark: the activation memory of one training step of Z-Image's and FLUX.2 klein's
transformers, measured on the CPU, against their memory models (core/families/*/memory.py). It
is how those models' bytes per token and hidden unit were calibrated, and tests/test_fit_families.py
runs it on small widths.

Each case builds the family's diffusers transformer with few blocks (at the real width 3840 /
3072 / 4096, or smaller), puts the LoRA on LORA_TARGETS, and runs forward + backward twice; the
second step's growth of peak RSS is the step's activations (VmHWM reset through
/proc/self/clear_refs; glibc with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS, as
tests/test_fit.py measures FLUX.1). "mixed" is the trainer's bf16: weights in bf16, bf16
autocast, the LoRA in float32.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/activation_memory.py zimage flux2 [--width W]
        [--cases '[[main or double blocks, refiners or single blocks, image tokens, text tokens,
                    checkpointing, mixed], ...]']

Prints one line a case (blocks, tokens, precision, checkpointing, measured MiB, estimated MiB,
ratio) and, last, the JSON list of measured bytes, family after family (what the test reads).
"""
import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rss(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def zimage_model(width, layers, refiners):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(dim=width, n_layers=layers, n_refiner_layers=refiners,
                                    n_heads=width // 128, n_kv_heads=width // 128, cap_feat_dim=64)


def zimage_step(model, image, text, dtype):
    side = int(round(image ** 0.5)) * 2   # latent side: 2x2 patches make `image` tokens
    latents = [torch.randn(16, 1, side, side, dtype=dtype)]
    captions = [torch.randn(text, 64, dtype=dtype)]
    return model(latents, torch.full((1,), 0.5, dtype=dtype), captions, return_dict=False)[0][0]


def flux2_model(width, layers, singles):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(in_channels=64, num_layers=layers, num_single_layers=singles,
                                   attention_head_dim=128, num_attention_heads=width // 128,
                                   joint_attention_dim=64, guidance_embeds=False)


def flux2_step(model, image, text, dtype):
    from diffusers import Flux2KleinPipeline

    side = int(round(image ** 0.5))
    latents = torch.randn(1, 64, side, side, dtype=dtype)
    captions = torch.randn(1, text, 64, dtype=dtype)
    return model(hidden_states=Flux2KleinPipeline._pack_latents(latents), encoder_hidden_states=captions,
                 timestep=torch.full((1,), 0.5, dtype=dtype),
                 img_ids=Flux2KleinPipeline._prepare_latent_ids(latents),
                 txt_ids=Flux2KleinPipeline._prepare_text_ids(captions), guidance=None, return_dict=False)[0]


FAMILIES = {"zimage": (zimage_model, zimage_step), "flux2": (flux2_model, flux2_step)}


def measure(family, width, layers, others, image, text, checkpointing, mixed):
    """(bytes of peak RSS one training step adds (the second of two), the model's shape as its
    memory model reads it)."""
    from loralab.core.families import get_family
    from loralab.core.lora import add_lora

    build, step = FAMILIES[family]
    torch.manual_seed(0)
    model = build(width, layers, others)
    dtype = torch.bfloat16 if mixed else torch.float32
    model.to(dtype).requires_grad_(False)
    add_lora(model, 4, 4, get_family(family).LORA_TARGETS)
    if checkpointing:
        model.enable_gradient_checkpointing()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    peaks = []
    for _ in range(2):  # the first step also allocates once-only buffers
        before = rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM, the peak resident size
        with autocast:
            output = step(model, image, text, dtype)
        output.float().pow(2).mean().backward()
        del output
        peaks.append(rss("VmHWM") - before)
        model.zero_grad(set_to_none=True)
    shape = get_family(family).memory.shape_of(dict(model.config), sum(p.numel() for p in model.parameters()))
    return min(peaks), {**shape, "text_tokens": text}


def estimate(family, shape, image, checkpointing, mixed):
    from loralab.core.families import get_family

    precision = "bf16" if mixed else "fp32"
    return get_family(family).memory.activation_bytes(shape, int(round(image ** 0.5)) * 16, 1, checkpointing,
                                                      precision, precision)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    parser.add_argument("--width", type=int, default=None, help="hidden width (default: the real one)")
    parser.add_argument("--cases", help="JSON list of [layers, others, image, text, checkpointing, mixed]")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cases = json.loads(args.cases) if args.cases else [
        [1, 1, 256, 64, False, False], [2, 1, 256, 64, False, False],
        [1, 1, 256, 64, True, False], [2, 1, 256, 64, True, False],
        [1, 1, 256, 64, False, True], [2, 1, 256, 64, False, True]]
    measured = []
    for family in args.families:
        width = args.width or {"zimage": 3840, "flux2": 3072}[family]
        for case in cases:
            peak, shape = measure(family, width, *case)
            try:
                guess = estimate(family, shape, case[2], case[4], case[5])
            except (NotImplementedError, KeyError):  # no memory model yet: measure only
                guess = 0
            measured.append(peak)
            print(f"{family} width {width} blocks {case[0]}+{case[1]} image {case[2]} text {case[3]} "
                  f"{'mixed' if case[5] else 'fp32'} checkpointing {'on' if case[4] else 'off'}: "
                  f"measured {peak / 2**20:.1f} MiB, estimate {guess / 2**20:.1f} MiB, "
                  f"ratio {guess / max(peak, 1):.2f}", flush=True)
    print(json.dumps(measured))


if __name__ == "__main__":
    main()
