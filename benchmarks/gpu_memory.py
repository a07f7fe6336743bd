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
    python benchmarks/gpu_memory.py --offload  # train.offload_blocks: 0 / half / all blocks of
                                               # FLUX.1-dev, Z-Image and Qwen-Image-sized models

--offload builds each model on the GPU (random bf16 weights, as above), then hands its frozen
block weights to core/memory/offload.py (pinned host memory), and trains through the family's
own training_loss at --offload-resolution; peak VRAM and s/step per count. The estimate column
is core.memory's estimate (peak_breakdown's allocated bytes) for the family's reference shapes.

--tiny proves the script runs (build, quantize, LoRA, steps, table); its RSS figures are rough
(the C allocator keeps freed memory of an earlier mode, so later modes read low).
"""
import argparse
import contextlib
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
    from loralab.core.families.parts.bnb import quantize_block_linears
    from loralab.core.families.parts.fp8 import replace_block_linears

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


OFFLOADED = {  # family: (transformer class, its arguments, text tokens and width, pooled width or None)
    "flux": ("FluxTransformer2DModel", dict(num_layers=19, num_single_layers=38, guidance_embeds=True), 512, 4096, 768),
    "zimage": ("ZImageTransformer2DModel", {}, 512, 2560, None),
    "qwen_image": ("QwenImageTransformer2DModel", {}, 512, 3584, None),
}
OFFLOADED_TINY = {
    "flux": ("FluxTransformer2DModel", dict(num_layers=1, num_single_layers=2, num_attention_heads=2,
                                            attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                                            pooled_projection_dim=16, guidance_embeds=True), 16, 32, 16),
    "zimage": ("ZImageTransformer2DModel", dict(dim=96, n_heads=3, n_kv_heads=3, n_layers=2, n_refiner_layers=1,
                                               cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[512, 64, 64]),
               16, 32, None),
    "qwen_image": ("QwenImageTransformer2DModel", dict(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                                       joint_attention_dim=32, axes_dims_rope=(4, 6, 6)), 16, 32, None),
}


def offload_model(spec, device, dtype):
    """A transformer of `spec` with random weights made on `device` (meta first: no CPU copy)."""
    import diffusers
    from accelerate import init_empty_weights

    name, arguments = spec[:2]
    with init_empty_weights():
        model = getattr(diffusers, name)(**arguments).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, device=device, generator=generator) * 0.02)
    return model.requires_grad_(False)


def offload_rows(family_name, spec, resolution, steps, device, dtype):
    """(family, offloaded, blocks, peak bytes, estimate or None, s/step) at 0, half and all blocks."""
    from loralab.core.config import with_defaults
    from loralab.core.families import get_family
    from loralab.core.lora import add_lora
    from loralab.core.memory.estimate import peak_breakdown
    from loralab.core.memory.offload import offload_blocks, restore
    from loralab.core.trainer.optimizers import make_optimizer

    family, rows = get_family(family_name), []
    config = with_defaults({"model": {"path": None, "family": family_name}, "network": {"linear": 16}})
    _, _, tokens, width, pooled = spec
    side = resolution // 8
    batch = {"latents": torch.randn(1, 16, side, side, device=device, dtype=dtype),
             "text": torch.randn(1, tokens, width, device=device, dtype=dtype),
             "pooled": (torch.randn(1, pooled, device=device, dtype=dtype) if pooled
                        else torch.ones(1, tokens, device=device, dtype=torch.bool))}
    model = offload_model(spec, device, dtype)
    blocks = family.offload_blocks(model)
    for count in (0, len(blocks) // 2, len(blocks)):
        offload = offload_blocks(model, blocks, count, device, checkpointed=True)
        with offload.weights_on_host() if offload else contextlib.nullcontext():
            parameters = add_lora(model, 16, 16, family.lora_targets(config["network"]))
        model.enable_gradient_checkpointing()
        model.train()
        optimizer = make_optimizer("adamw8bit" if device == "cuda" else "adamw", parameters, 1e-4)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps):
            started = time.perf_counter()
            with torch.autocast(device, dtype):
                loss = family.training_loss(model, batch, torch.Generator().manual_seed(step),
                                            config["train"], pooled is not None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None  # --tiny: not measured
        # the estimate of the family's reference (full-size) shapes, allocated bytes only: not
        # comparable with --tiny's model
        estimate = (peak_breakdown(config, "none", True, resolution, offload_blocks=count).allocated
                    if device == "cuda" else None)
        later = sorted(times[2:] or times)
        rows.append((family_name, count, len(blocks), peak, estimate, later[len(later) // 2]))
        del optimizer, parameters
        restore(model)
        model.unload_lora() if hasattr(model, "unload_lora") else None
        model.to(device)
    del model
    return rows


def main_offload(args, device, dtype):
    resolution = args.offload_resolution // (8 if args.tiny else 1)
    specs = OFFLOADED_TINY if args.tiny else OFFLOADED
    print(f"{'family':<11}{'offloaded':>12}{'peak GiB':>10}{'estimate':>10}{'s/step':>9}   at {resolution} px",
          flush=True)
    for family_name in args.families.split(","):
        try:
            rows = offload_rows(family_name, specs[family_name], resolution, args.steps, device, dtype)
        except Exception as error:  # report and go on with the next family
            print(f"{family_name:<11} skipped: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            gc.collect()
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        for name, count, blocks, peak, estimate, seconds in rows:
            estimated, measured = ("-" if value is None else f"{value / 2**30:.2f}" for value in (estimate, peak))
            print(f"{name:<11}{f'{count}/{blocks}':>12}{measured:>10}{estimated:>10}{seconds:>9.3f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--modes", default="none,fp8,int8,nf4")
    parser.add_argument("--budget", type=float, default=420, help="seconds; later modes are skipped")
    parser.add_argument("--offload", action="store_true", help="the train.offload_blocks table instead")
    parser.add_argument("--families", default="flux,zimage,qwen_image", help="--offload: which models")
    parser.add_argument("--offload-resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny")
    if args.offload:
        return main_offload(args, device, torch.bfloat16)
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
