"""Regularization images (dataset.regularization_folder, _ratio, _weight): pictures of what the
model must keep drawing, trained beside the dataset, captioned as written.

What a user sees: the LoRA trained with them moves the base model less on their scenes (the
shapes model's loss, measured with diffusers' pipeline and the LoRA file loaded by diffusers),
each epoch holds `ratio` of them per training image, a changed regularization picture starts a
new run folder, and a wrong folder is named by its key."""
import json
import os

import numpy
import pytest
import torch
from PIL import Image
from diffusers import FluxPipeline

from loralab.core.config import resolve
from loralab.core.dataset import BatchPlan, DatasetError, scan_folder
from loralab.core.demo.score import BLEED_PROMPT
from loralab.core.demo.dataset import make_shapes_dataset
from loralab.core.demo import resolve_dataset_folder
from loralab.core.families.builtin import resolve_model_path
from loralab.core.families.loss import weighted_mse
from loralab.core.trainer import train

from test_preservation import flux_outputs, mse

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_epoch_holds_as_many_regularization_entries_as_training_entries_and_goes_through_them():
    training = {0: [(64, 64)], 1: [(64, 64)], 2: [(64, 64)]}
    others = {index: [(64, 64)] for index in range(3, 10)}  # 7 regularization images
    plan = BatchPlan(training, 2, 1, seed=5, regularization=others)
    seen = []
    for epoch in range(3):
        images = [entry.image for batch in plan.epoch(epoch) for entry in batch]
        assert sorted(i for i in images if i in training) == [0, 0, 1, 1, 2, 2]
        seen += [i for i in images if i in others]
        assert len([i for i in images if i in others]) == 6
    # 18 entries over 7 pictures: each is used twice or three times, none forgotten
    assert sorted(seen.count(i) for i in others) == [2, 2, 2, 3, 3, 3, 3]
    quarter = BatchPlan(training, 2, 1, seed=5, regularization=others, ratio=0.25)
    assert [len([e for b in quarter.epoch(n) for e in b if e.image in others]) for n in range(3)] == [2, 2, 2]
    assert BatchPlan(training, 2, 1, seed=5).epoch(0) != plan.epoch(0)
    assert sum(len(batch) for batch in BatchPlan(training, 2, 1, seed=5).epoch(0)) == 6


def test_the_loss_weighs_each_entry_as_torch_computes_it():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 6, generator=generator)
    reference = torch.nn.functional.mse_loss(prediction, target)
    assert weighted_mse(prediction, target).item() == pytest.approx(reference.item())
    assert weighted_mse(prediction, target, None, torch.ones(2)).item() == pytest.approx(reference.item())
    first_only = torch.nn.functional.mse_loss(prediction[:1], target[:1]) / 2
    assert weighted_mse(prediction, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(first_only.item())
    halves = torch.tensor([0.5, 2.0])
    by_hand = (0.5 * torch.nn.functional.mse_loss(prediction[0], target[0])
               + 2.0 * torch.nn.functional.mse_loss(prediction[1], target[1])) / 2
    assert weighted_mse(prediction, target, halves).item() == pytest.approx(by_hand.item())


def test_the_shapes_set_leaves_out_the_bleed_test_scene(tmp_path):
    folder = make_shapes_dataset(str(tmp_path / "shapes"), count=40)
    captions = [open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder)) if name.endswith(".txt")]
    assert len(captions) == 40 and BLEED_PROMPT not in captions
    assert len(set(captions)) > 30 and all("[trigger]" not in c and "sks" not in c for c in captions)


def shapes_config(output, steps, **dataset):
    return resolve({
        "name": "star", "model": {"path": "builtin:tiny-flux", "dtype": "fp32"}, "network": {"linear": 16},
        # the demo's pictures by path: builtin:demo would add the demo's pixel scores to each run
        "dataset": {"folder": resolve_dataset_folder("builtin:demo"), "trigger_word": "sks", "resolution": [64],
                    "caption_dropout_rate": 0.05, **dataset},
        "train": {"steps": steps, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32", "timestep_type": "shift",
                  "gradient_checkpointing": False},
        "save": {"save_every": 1000, "output_dir": str(output), "dtype": "float32"},
        "sample": {"sample_every": 0}})


def latents_of(pipeline, images):
    """The VAE's normalised latents of 64 px PIL images, by diffusers' own VAE."""
    pixels = torch.stack([torch.from_numpy(numpy.asarray(image.convert("RGB").resize((64, 64), Image.LANCZOS)))
                          .permute(2, 0, 1).float() / 127.5 - 1 for image in images])
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean
    return (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor


def test_regularization_keeps_the_shapes_model_drawing_its_own_scenes(tmp_path):
    """The star trained on the shapes model, without and with builtin:demo-shapes: on those
    scenes, at fixed noise, the LoRA without them moves the model's loss away from the base's,
    the LoRA with them less; both learn the star (its pictures' loss falls). (On the red
    circle, which the set leaves out, 150 steps of either LoRA moved the loss alike, 0.23 ->
    0.43: at the loss level these pictures hold what they show.)"""
    runs = {name: train(shapes_config(tmp_path / name, 150, **dataset))
            for name, dataset in [("off", {}), ("on", {"regularization_folder": "builtin:demo-shapes"})]}
    pipeline = FluxPipeline.from_pretrained(resolve_model_path("builtin:tiny-flux"), local_files_only=True)
    shapes = scan_folder(resolve_dataset_folder("builtin:demo-shapes"), "txt", "").items[:8]
    shape_latents = latents_of(pipeline, [Image.open(item.path) for item in shapes])
    stars = scan_folder(resolve_dataset_folder("builtin:demo"), "txt", "sks").items
    star_latents = latents_of(pipeline, [Image.open(item.path) for item in stars])
    measured = {}
    for name in ("base", *runs):
        if name != "base":
            pipeline.load_lora_weights(runs[name].lora_path, adapter_name=name)
        measured[name] = (mse(flux_outputs(pipeline, shape_latents, [item.caption for item in shapes])),
                          mse(flux_outputs(pipeline, star_latents, [item.caption for item in stars])))
        pipeline.unload_lora_weights()
    change = {name: abs(measured[name][0] - measured["base"][0]) for name in runs}
    assert change["off"] > 0.02, measured  # the star bled into the shapes: a broken test cannot pass
    # measured: 0.14 against 0.21 (0.68x) at this short, high-rate run; ignored pictures give 1x
    assert change["on"] < 0.8 * change["off"], measured
    for name in runs:
        assert measured[name][1] < 0.8 * measured["base"][1], measured
    with open(os.path.join(runs["on"].run_folder, "config.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded["dataset_stats"]["regularization_images"] == 16
    assert recorded["dataset_stats"]["images"] == 8


def test_a_changed_regularization_picture_starts_a_new_run_folder(make_config, tmp_path):
    shapes = make_shapes_dataset(str(tmp_path / "shapes"), count=3, size=64)
    raw = make_config(train={"steps": 2}, dataset={"regularization_folder": shapes})
    first = train(resolve(raw))
    assert first.status == "finished"
    assert train(resolve(raw)).status == "already finished"
    with open(os.path.join(shapes, "image_001.txt"), "w", encoding="utf-8") as f:
        f.write("a green square on a black background")
    again = train(resolve(raw))
    assert again.status == "finished" and again.run_folder != first.run_folder


def test_a_missing_regularization_folder_is_named_by_its_key(make_config, tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(DatasetError) as error:
        train(resolve(make_config(train={"steps": 2}, dataset={"regularization_folder": missing})))
    assert "dataset.regularization_folder" in str(error.value) and missing in str(error.value)
    assert not os.path.exists(tmp_path / "output")  # refused before a run folder was made


def test_the_builtin_shapes_set_resolves_to_pictures_with_captions():
    folder = resolve_dataset_folder("builtin:demo-shapes")
    names = sorted(os.listdir(folder))
    assert len([n for n in names if n.endswith(".png")]) == 16 == len([n for n in names if n.endswith(".txt")])
