"""Benchmark: peak memory and seconds per step of LoRA training on a FLUX.1-dev-shaped transformer
(19 double, 38 single blocks, hidden 3072, 24 heads) in each model.quantize mode, beside the
estimate of core.memory. Random weights are made on the GPU itself (meta device, then empty
on cuda and filled layer by layer): nothing is downloaded and no CPU copy is made.

Each mode trains a rank-16 LoRA (peft, core.families.flux.LORA_TARGETS, adamw8bit, bf16
autocast, gradient checkpointing on) for --steps steps at each resolution, with 512 T5 tokens.
Peak = torch.cuda.max_memory_allocated (no CUDA context: compared with the estimate's
"allocated" part). A mode that fails (bitsandbytes missing, out of memory) is skipped, saying why.

    python benchmarks/gpu_memory.py            # CUDA, about 5 minutes on an H200
    python benchmarks/gpu_memory.py --tiny     # a small shape on the CPU, peak RSS growth

--tiny proves the script runs (build, quantize, LoRA, steps, table); its RSS figures are rough
(the C allocator keeps freed memory of an earlier mode, so later modes read low).
"""
import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

FULL = {"heads": 24, "layers": 19, "single": 38, "text": 512, "joint": 4096, "pooled": 768,
        "in_channels": 64}
TINY = {"heads": 4, "layers": 1, "single": 2, "text": 64, "joint": 64, "pooled": 32,
        "in_channels": 64}


def status_bytes(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def build(shape, mode, device, dtype):
    """The transformer on `device`, block linears stored as `mode` says, random weights."""
    from loralab.core.families.flux.bnb import quantize_block_linears
    from loralab.core.families.flux.fp8 import replace_block_linears

    model = empty_model(shape).to(dtype)  # still on meta: nothing is allocated
    if mode == "fp8":
        replace_block_linears(model, dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                fresh = torch.randn(tensor.shape, device=device, dtype=torch.float32,
                                    generator=generator) * 0.02
                tensor.copy_(fresh)
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.fill_(1.0)
    if mode in ("nf4", "int8"):
        quantize_block_linears(model, mode, dtype, device)
    model.requires_grad_(False)
    return model


def train_steps(model, shape, resolution, steps, device, dtype):
    """Seconds per step (median of the steps after two warm-up ones) of a LoRA step."""
    from loralab.core.trainer.optimizers import make_optimizer

    tokens = (resolution // 16) ** 2
    batch = dict(hidden_states=torch.randn(1, tokens, shape["in_channels"], device=device, dtype=dtype),
                 encoder_hidden_states=torch.randn(1, shape["text"], shape["joint"], device=device, dtype=dtype),
                 pooled_projections=torch.randn(1, shape["pooled"], device=device, dtype=dtype),
                 timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                 guidance=torch.ones(1, device=device, dtype=dtype),
                 img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(shape["text"], 3, device=device))
    target = torch.randn(1, tokens, shape["in_channels"], device=device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw8bit" if device == "cuda" else "adamw", parameters, 1e-4)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(device, dtype):
            prediction = model(**batch, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    later = sorted(times[2:] or times)
    return later[len(later) // 2]


def predicted(shape, mode, resolution, device):
    from loralab.core.config import with_defaults
    from loralab.core.families.flux.memory import _shape_of
    from loralab.core.memory import peak_breakdown

    config = with_defaults({"model": {"path": None}, "network": {"linear": 16},
                            "train": {"optimizer": "adamw8bit"}})
    model_shape = _shape_of({"num_layers": shape["layers"], "num_single_layers": shape["single"],
                             "num_attention_heads": shape["heads"], "attention_head_dim": 128,
                             "guidance_embeds": shape["text"] == 512}, 0)
    model_shape["parameters"] = sum(p.numel() for p in empty_model(shape).parameters())
    estimate = peak_breakdown(config, mode, True, resolution, (model_shape, "benchmark"), device)
    return estimate.allocated - estimate.vae   # the benchmark has no VAE


def empty_model(shape):
    """The transformer on the meta device: shapes only, no memory."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel(
            in_channels=shape["in_channels"], num_layers=shape["layers"],
            num_single_layers=shape["single"], num_attention_heads=shape["heads"],
            attention_head_dim=128, joint_attention_dim=shape["joint"],
            pooled_projection_dim=shape["pooled"], guidance_embeds=True)


def run_mode(shape, mode, resolutions, steps, device, dtype):
    from loralab.core.families.flux import LORA_TARGETS
    from loralab.core.lora import add_lora

    rows = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = status_bytes("VmRSS") if device == "cpu" else 0
    model = build(shape, mode, device, dtype)
    add_lora(model, 16, 16, {"target_modules": LORA_TARGETS})
    model.enable_gradient_checkpointing()
    model.train()
    for resolution in resolutions:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        seconds = train_steps(model, shape, resolution, steps, device, dtype)
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else status_bytes("VmHWM") - baseline)
        rows.append((mode, resolution, peak, predicted(shape, mode, resolution, device), seconds))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--modes", default="none,fp8,int8,nf4")
    parser.add_argument("--budget", type=float, default=420, help="seconds; later modes are skipped")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny")
    shape = TINY if args.tiny else FULL
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if args.tiny:
        resolutions = [r // 4 for r in resolutions]
    dtype = torch.bfloat16
    started = time.perf_counter()
    print(f"{'mode':<6}{'res':>6}{'peak GiB':>10}{'estimate':>10}{'est/peak':>10}{'s/step':>9}", flush=True)
    for mode in args.modes.split(","):
        if time.perf_counter() - started > args.budget:
            print(f"{mode:<6} skipped: over the {args.budget:.0f} s budget", flush=True)
            continue
        if mode in ("int8", "nf4") and device != "cuda":
            print(f"{mode:<6} skipped: bitsandbytes {mode} needs CUDA", flush=True)
            continue
        try:
            rows = run_mode(shape, mode, resolutions, args.steps, device, dtype)
        except Exception as error:  # report and go on with the next mode
            print(f"{mode:<6} skipped: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        for mode_, resolution, peak, estimate, seconds in rows:
            print(f"{mode_:<6}{resolution:>6}{peak / 2**30:>10.2f}{estimate / 2**30:>10.2f}"
                  f"{estimate / peak:>10.2f}{seconds:>9.3f}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
