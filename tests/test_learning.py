"""Training must actually learn: the flow-matching loss on the training images, measured with
diffusers' own transformer and the saved LoRA file at fixed noise and noise levels, falls well
under the base model's, and is lowest at strength 1 (so a scale error in the file cannot pass)."""
import pytest
import torch
from diffusers import FluxPipeline

from loralab.core.config import resolve
from loralab.core.dataset import load_for_bucket, scan_folder
from loralab.core.demo.dataset import make_demo_dataset
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.parts import flow
from loralab.core.trainer import train


@pytest.fixture(scope="module")
def learned(tiny_flux, tmp_path_factory):
    folder = make_demo_dataset(str(tmp_path_factory.mktemp("learn") / "data"), count=3)
    config = resolve({
        "name": "learn", "model": {"path": tiny_flux, "dtype": "fp32"},
        "dataset": {"folder": folder, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
        "train": {"steps": 150, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False},
        "save": {"save_every": 1000, "output_dir": str(tmp_path_factory.mktemp("learn-out"))},
        "sample": {"sample_every": 0}})
    return train(config), folder


def flow_matching_loss(pipeline, latents, text, pooled):
    generator = torch.Generator().manual_seed(123)  # the same noise and levels for every model
    losses = []
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.rand(latents.shape[0], generator=generator) * 0.9 + 0.05
            noisy, target = flow.noisy_latents(latents, noise, sigmas)
            prediction = flux.predict(pipeline.transformer, flow.pack(noisy), sigmas, text, pooled,
                                      latents.shape[2], latents.shape[3], 1.0)
            losses.append(torch.nn.functional.mse_loss(prediction, flow.pack(target)).item())
    return sum(losses) / len(losses)


def training_batch(pipeline, folder):
    """(latents, T5 text, pooled CLIP) of the training images in `folder`, at 64 px."""
    items = scan_folder(folder, "txt", "sks").items
    latents = torch.stack([flux.encode_image(pipeline, load_for_bucket(i.path, (64, 64)), "cpu") for i in items])
    encoded = flux.encode_prompts(pipeline, [i.caption for i in items], "cpu")
    return (latents, torch.stack([encoded[i.caption][0] for i in items]),
            torch.stack([encoded[i.caption][1] for i in items]))


def test_lora_lowers_the_loss_on_its_training_images(learned, tiny_flux):
    result, folder = learned
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    latents, text, pooled = training_batch(pipeline, folder)
    base = flow_matching_loss(pipeline, latents, text, pooled)
    pipeline.load_lora_weights(result.lora_path, adapter_name="trained")
    by_strength = {}
    for strength in (1.0, 0.5, 2.0, -1.0):
        pipeline.set_adapters(["trained"], adapter_weights=[strength])
        by_strength[strength] = flow_matching_loss(pipeline, latents, text, pooled)
    assert by_strength[1.0] < 0.55 * base, (base, by_strength)
    assert by_strength[1.0] < by_strength[0.5] and by_strength[1.0] < by_strength[2.0], by_strength
    assert by_strength[-1.0] > base  # a sign error would learn the opposite direction
