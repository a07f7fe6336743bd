"""Benchmark: what one training step of `loralab train` costs against two references, measured in
one run on the same machine, for the tiny model and a larger FLUX-shaped random one.

  ours   - core.trainer.train: cached latents and text embeddings, LoRA, optimizer step
  plain  - the naive loop: every step loads the image, runs the VAE and both text encoders
  floor  - forward + backward of the frozen transformer (with the LoRA attached, so there are
           gradients), on tensors prepared in advance: no data, no optimizer

Each variant runs in its own process so its peak memory (RSS) is its own. Prints seconds per
step, peak MiB and the ratios ours/floor and plain/ours. Target: ours <= 1.15 x floor.

    python benchmarks/train_step.py [--steps 40] [--presets tiny,small]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {"tiny": {"resolution": 64}, "small": {"resolution": 256}}


def optimizer_name():
    # bitsandbytes' 8-bit AdamW runs on CPUs but slowly (seconds per step for a 1M-parameter
    # LoRA): on a CPU-only machine the guide's adamw8bit would measure bitsandbytes, not us.
    import torch

    return "adamw8bit" if torch.cuda.is_available() else "adamw"


def config_for(model, data, output, preset, steps):
    from loralab.core.config import resolve

    return resolve({
        "name": f"bench_{preset}", "model": {"path": model, "dtype": "fp32"},
        "dataset": {"folder": data, "trigger_word": "sks", "resolution": [SETTINGS[preset]["resolution"]],
                    "caption_dropout_rate": 0.0},
        "train": {"steps": steps, "dtype": "fp32", "gradient_checkpointing": False, "optimizer": optimizer_name(),
                  "resume": False},
        "save": {"output_dir": output, "save_every": 10 * steps},
        "sample": {"sample_every": 0}, "logging": {"performance_log_every": 5}})


def measure_ours(config):
    from loralab.core.runs import RunFolder
    from loralab.core.trainer import train

    train(config)
    lines = RunFolder(config["save"]["output_dir"], config["name"]).read_metrics()
    return statistics.median(m["seconds_per_step"] for m in lines[1:])  # first window warms up


def _setup(config):
    import torch

    from loralab.core.dataset import load_for_bucket, scan_folder
    from loralab.core.families.flux import FAMILY as flux
    from loralab.core.lora import add_lora

    pipeline = flux.load(config["model"]["path"], dtype="fp32")
    parameters = add_lora(pipeline.transformer, 16, 16, {"target_modules": flux.LORA_TARGETS})
    items = scan_folder(config["dataset"]["folder"], "txt", "sks").items
    size = (config["dataset"]["resolution"][0],) * 2
    return torch, flux, pipeline, parameters, items, size, load_for_bucket


def _timed(step, steps):
    for _ in range(3):  # warm-up
        step(0)
    started = time.perf_counter()
    for index in range(steps):
        step(index)
    return (time.perf_counter() - started) / steps


def measure_plain(config, steps):
    from loralab.core.trainer.optimizers import make_optimizer

    torch, flux, pipeline, parameters, items, size, load_for_bucket = _setup(config)
    optimizer = make_optimizer(config["train"]["optimizer"], parameters, 1e-4)
    generator = torch.Generator().manual_seed(0)

    def step(index):
        item = items[index % len(items)]
        latents = flux.encode_image(pipeline, load_for_bucket(item.path, size), "cpu")[None]
        text, pooled = flux.encode_prompts(pipeline, [item.caption], "cpu")[item.caption]
        batch = {"latents": latents, "text": text[None], "pooled": pooled[None]}
        loss = flux.training_loss(pipeline.transformer, batch, generator,
                                  {"timestep_type": "sigmoid", "guidance": 1.0}, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, steps)


def measure_floor(config, steps):
    torch, flux, pipeline, parameters, items, size, load_for_bucket = _setup(config)
    item = items[0]
    latents = flux.encode_image(pipeline, load_for_bucket(item.path, size), "cpu")[None]
    text, pooled = flux.encode_prompts(pipeline, [item.caption], "cpu")[item.caption]
    batch = {"latents": latents, "text": text[None], "pooled": pooled[None]}
    generator = torch.Generator().manual_seed(0)

    def step(index):
        loss = flux.training_loss(pipeline.transformer, batch, generator,
                                  {"timestep_type": "sigmoid", "guidance": 1.0}, True)
        loss.backward()
        for parameter in parameters:
            parameter.grad = None

    return _timed(step, steps)


def child(args):
    config = config_for(args.model, args.data, args.output, args.preset, args.steps)
    if args.variant == "ours":
        seconds = measure_ours(config)
    elif args.variant == "plain":
        seconds = measure_plain(config, args.steps)
    else:
        seconds = measure_floor(config, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds_per_step": seconds, "peak_mb": peak}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--variant")
    parser.add_argument("--preset")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.variant:
        return child(args)

    from loralab.core.demo.dataset import make_demo_dataset
    from loralab.core.families.flux.tiny import build_tiny_flux

    workspace = tempfile.mkdtemp(prefix="loralab-bench-")
    data = make_demo_dataset(os.path.join(workspace, "data"), count=6, size=(320, 320))
    print(f"optimizer: {optimizer_name()}")
    print(f"{'preset':8} {'variant':6} {'s/step':>9} {'peak MiB':>9}")
    for preset in args.presets.split(","):
        model = build_tiny_flux(os.path.join(workspace, preset), preset=preset)
        results = {}
        for variant in ("floor", "ours", "plain"):
            output = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--preset", preset, "--model", model,
                 "--data", data, "--output", os.path.join(workspace, "runs"), "--steps", str(args.steps)],
                capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(output.strip().splitlines()[-1])
            print(f"{preset:8} {variant:6} {results[variant]['seconds_per_step']:9.4f} "
                  f"{results[variant]['peak_mb']:9.0f}", flush=True)
        ours, floor, plain = (results[v]["seconds_per_step"] for v in ("ours", "floor", "plain"))
        print(f"{preset:8} ours/floor = {ours / floor:.2f} (target <= 1.15), plain/ours = {plain / ours:.2f}, "
              f"peak ours/floor = {results['ours']['peak_mb'] / results['floor']['peak_mb']:.2f}, "
              f"peak plain/ours = {results['plain']['peak_mb'] / results['ours']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
