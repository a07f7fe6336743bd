"""Pretrain the shapes model: `python -m loralab.core.families.flux.shapes.pretrain OUT_DIR
[--minutes N | --steps N] [--seed S] [--init FILE]` (--init: go on training a packed model).

1. Build the random FLUX-shaped folder (base.py) in OUT_DIR/model.
2. Fit its tiny VAE to the scenes, so latents decode back to pictures, and set its latent shift
   and scale so the flow-matching latents have mean 0 and std 1.
3. Train the whole transformer with the flow-matching loss on freshly drawn scenes at 64 px, the
   VAE and text encoders frozen. Most steps see the text cut to its first 32 tokens (the
   captions are shorter), which is 5x cheaper; the last share sees all 512, as sampling does.
4. Write OUT_DIR/shapes-flux.safetensors, the one shipped file (packed.py).

Every scene, noise and timestep comes from the seed and the step, and a state file is written
every few minutes, so a stopped run resumes where it was and ends with the same numbers.

The shipped shapes-flux.safetensors is two runs on one CPU core, 77 minutes in all:
- `--minutes 42 --vae-minutes 4 --seed 0`, which planned `--steps 5067 --full-steps 271`: 30
  minutes (VAE reconstruction MSE 0.0098 in [-1, 1]); it drew the colours but blobs;
- `--init <that file> --steps 8000 --full-steps 300 --seed 1`: 47 minutes, new scenes.
5.2M transformer parameters, 11.4 MB in fp16. Sampled at 64 px, 8 steps, guidance 4
(tests/test_shapes_model.py), 8 prompts x 2 seeds: background 16/16, shape colour 16/16, form
10/16 (a random model of the same kind: backgrounds 2/16, colours 4/16).
"""
import argparse
import json
import os
import time

import numpy
import torch

from ...parts import flow
from .. import FAMILY as flux
from .base import build_base
from .packed import build_shapes_flux, pack_folder
from .scenes import all_captions, random_scene

SIZE = 64
SHORT_TEXT = 32  # tokens: every caption fits (7 T5 tokens + </s>)
FULL_TEXT_SHARE = 0.35  # of the transformer's time spent on all 512 text tokens
BATCH = 8
VAE_BATCH = 16


def log(message):
    print(time.strftime("%H:%M:%S"), message, flush=True)


def scene_batch(seed, first, count):
    """Pixels [count, 3, 64, 64] in [-1, 1] and captions of scenes first..first+count-1."""
    scenes = [random_scene(seed * 1_000_000_007 + first + i, SIZE) for i in range(count)]
    pixels = numpy.stack([numpy.asarray(image, dtype=numpy.float32) for image, _ in scenes]) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), [text for _, text in scenes]


def fit_vae(vae, seconds, seed):
    """Train the VAE to reconstruct scenes for `seconds` (a small KL term keeps latents tame)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    start, step = time.time(), 0
    while time.time() - start < seconds:
        pixels, _ = scene_batch(seed + 1, step * VAE_BATCH, VAE_BATCH)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
        step += 1
    vae.eval()
    with torch.no_grad():  # latent statistics over fresh scenes -> shift and scale
        pixels, _ = scene_batch(seed + 2, 0, 256)
        latents = vae.encode(pixels).latent_dist.mean
        error = torch.nn.functional.mse_loss(vae.decode(latents).sample, pixels).item()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    log(f"vae fitted in {step} steps, reconstruction mse {error:.4f}, "
        f"shift {vae.config.shift_factor:.4f} scale {vae.config.scaling_factor:.4f}")
    return error


def build_and_fit(model_folder, vae_seconds, seed, init=None):
    from diffusers import FluxPipeline

    if init and not os.path.isfile(os.path.join(model_folder, "vae_fitted.json")):
        build_shapes_flux(model_folder, init)  # a second stage: every weight from an earlier run
        with open(os.path.join(model_folder, "vae_fitted.json"), "w") as f:
            json.dump({"from": os.path.basename(init)}, f)
    if not os.path.isfile(os.path.join(model_folder, "vae_fitted.json")):
        build_base(model_folder, seed)
        pipeline = FluxPipeline.from_pretrained(model_folder)
        error = fit_vae(pipeline.vae, vae_seconds, seed)
        pipeline.vae.save_pretrained(os.path.join(model_folder, "vae"))
        with open(os.path.join(model_folder, "vae_fitted.json"), "w") as f:
            json.dump({"reconstruction_mse": error, "seconds": vae_seconds}, f)
    return FluxPipeline.from_pretrained(model_folder)


class Trainer:
    """The transformer's flow-matching steps, each one fixed by (seed, step)."""

    def __init__(self, pipeline, seed):
        self.pipeline, self.seed = pipeline, seed
        self.transformer = pipeline.transformer
        captions = all_captions()
        encoded = flux.encode_prompts(pipeline, captions, "cpu")  # 512 T5 tokens, as sampling reads
        self.text = {c: encoded[c][0] for c in captions}
        self.pooled = {c: encoded[c][1] for c in captions}
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=3e-4, weight_decay=0.01)

    def loss(self, step, text_tokens):
        pixels, captions = scene_batch(self.seed, step * BATCH, BATCH)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        with torch.no_grad():
            latents = flow.normalize_latents(self.pipeline.vae.encode(pixels).latent_dist.mean,
                                             self.pipeline.vae.config)
        # half logit-normal (where the detail is learned), half uniform (sampling starts at s = 1)
        sigmas = torch.where(torch.rand(BATCH, generator=generator) < 0.5,
                             torch.sigmoid(torch.randn(BATCH, generator=generator)),
                             torch.rand(BATCH, generator=generator))
        noise = torch.randn(latents.shape, generator=generator)
        noisy, target = flow.noisy_latents(latents, noise, sigmas)
        guidance = 1 + 4 * torch.rand(1, generator=generator).item()  # trained 1.0, sampled 4.0
        text = torch.stack([self.text[c][:text_tokens] for c in captions])
        pooled = torch.stack([self.pooled[c] for c in captions])
        height, width = latents.shape[2:]
        prediction = flux.predict(self.transformer, flow.pack(noisy), sigmas, text, pooled, height, width, guidance)
        return torch.nn.functional.mse_loss(prediction, flow.pack(target))

    def step(self, step, plan):
        text_tokens = SHORT_TEXT if step < plan["short_steps"] else None
        total = plan["short_steps"] + plan["full_steps"]
        # warm up over 100 steps, then fall linearly to a tenth
        scale = min(1.0, (step + 1) / 100) * (1 - 0.9 * step / total)
        for group in self.optimizer.param_groups:
            group["lr"] = 3e-4 * scale
        loss = self.loss(step, text_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def seconds_per_step(self, text_tokens, tries=3):
        """Measured on throwaway gradients, so the plan does not change the weights."""
        start = time.time()
        for step in range(tries):
            self.loss(step, text_tokens).backward()
        self.optimizer.zero_grad()
        return (time.time() - start) / tries


def plan_steps(trainer, minutes, steps, full_steps):
    if steps:  # a 512-token step costs ~5x a short one: a tenth of the steps is ~a third of the time
        full = full_steps or max(1, steps // 10)
        return {"short_steps": steps - full, "full_steps": full}
    seconds = minutes * 60
    short, full = trainer.seconds_per_step(SHORT_TEXT), trainer.seconds_per_step(None)
    log(f"measured {short:.2f} s/step at {SHORT_TEXT} text tokens, {full:.2f} s/step at 512")
    return {"short_steps": int(seconds * (1 - FULL_TEXT_SHARE) / short),
            "full_steps": max(1, int(seconds * FULL_TEXT_SHARE / full))}


def train_transformer(pipeline, out_dir, minutes, steps, full_steps, seed):
    state_path = os.path.join(out_dir, "pretrain-state.pt")
    trainer = Trainer(pipeline, seed)
    start_step = 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=False)
        trainer.transformer.load_state_dict(state["transformer"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        plan, start_step = state["plan"], state["step"]
        log(f"resumed at step {start_step}")
    else:
        plan = plan_steps(trainer, minutes, steps, full_steps)
    total = plan["short_steps"] + plan["full_steps"]
    log(f"plan: {plan} (--steps {total} --full-steps {plan['full_steps']} repeats it)")
    trainer.transformer.train()
    last_save, recent = time.time(), []
    for step in range(start_step, total):
        recent.append(trainer.step(step, plan))
        if step % 25 == 0 or step == total - 1:
            log(f"step {step}/{total} loss {sum(recent) / len(recent):.4f}")
            recent = []
        if time.time() - last_save > 300 or step == total - 1:
            torch.save({"transformer": trainer.transformer.state_dict(), "plan": plan, "step": step + 1,
                        "optimizer": trainer.optimizer.state_dict()}, state_path)
            last_save = time.time()
    trainer.transformer.eval()
    return plan


def _digest(path):
    import hashlib

    with open(path, "rb") as f:
        return f"{os.path.basename(path)} sha256:{hashlib.sha256(f.read()).hexdigest()[:12]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=float, default=45.0, help="the transformer's training time")
    parser.add_argument("--steps", type=int, default=0, help="a fixed step count instead of --minutes")
    parser.add_argument("--full-steps", type=int, default=0, help="of --steps, those at 512 text tokens")
    parser.add_argument("--vae-minutes", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="a shapes-flux.safetensors to go on training (a second stage, "
                        "with its own --seed so it draws new scenes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("LORALAB_THREADS", "1")))
    model_folder = os.path.join(args.out_dir, "model")
    started = time.time()
    pipeline = build_and_fit(model_folder, args.vae_minutes * 60, args.seed, args.init)
    plan = train_transformer(pipeline, args.out_dir, args.minutes, args.steps, args.full_steps, args.seed)
    pipeline.transformer.save_pretrained(os.path.join(model_folder, "transformer"))
    path = pack_folder(model_folder, os.path.join(args.out_dir, "shapes-flux.safetensors"),
                       {"plan": json.dumps(plan), "seed": str(args.seed),
                        "minutes": f"{(time.time() - started) / 60:.1f}",
                        **({"init": _digest(args.init)} if args.init else {})})
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
