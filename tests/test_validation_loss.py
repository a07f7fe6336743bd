"""The validation loss (dataset.validation_images) and the coach's overfitting sign: which images
are held out, the fixed-noise measurement, the two-curve plot, the sign on made-up curves, and a
real LoRA that memorises one image while the other is held out."""
import contextlib
import json
import math
import os
import random
import re

import numpy
import pytest
import torch

from loralab.core.coach import loss_signs
from loralab.core.coach.monitor import Monitor
from loralab.core.config import ConfigError, resolve
from loralab.core.dataset import DatasetError, Item, Scan, hold_out
from loralab.core.families.flux.shapes.scenes import draw_scene
from loralab.core.runs import RunFolder
from loralab.core.runs.plot import COLORS, loss_plot
from loralab.core.trainer import train
from loralab.core.trainer.validation import HeldOut

pytestmark = pytest.mark.usefixtures("one_thread")


def scan_of(count):
    return Scan("/data", [Item(f"/data/{i:02d}.png", f"caption {i}", 64, 48) for i in range(count)])


# -- which images are held out ------------------------------------------------------------------

def test_held_out_images_are_spread_evenly_over_the_sorted_names():
    assert hold_out(scan_of(5), 0) == ([0, 1, 2, 3, 4], [])
    assert hold_out(scan_of(2), 1) == ([0], [1])
    assert hold_out(scan_of(10), 2) == ([0, 1, 3, 4, 5, 6, 8, 9], [2, 7])
    assert hold_out(scan_of(10), 9)[0] == [4]  # the one left is in the middle
    assert hold_out(scan_of(7), 3) == hold_out(scan_of(7), 3)  # no randomness at all


@pytest.mark.parametrize("count, held", [(1, 1), (3, 3), (3, 10)])
def test_holding_out_every_image_is_refused_with_the_setting(count, held):
    with pytest.raises(DatasetError) as error:
        hold_out(scan_of(count), held)
    message = str(error.value)
    assert f"dataset.validation_images = {held}" in message and f"at most {count - 1}" in message


def test_the_setting_is_in_the_schema():
    base = {"model": {"path": "m", "family": "flux"}, "dataset": {"folder": "d"}}
    assert resolve(base)["dataset"]["validation_images"] == 0
    with pytest.raises(ConfigError, match=r"dataset.validation_images = -1: must be at least 0"):
        resolve({**base, "dataset": {"folder": "d", "validation_images": -1}})


def test_the_load_dataset_node_takes_it_as_an_optional_widget(demo_dataset):
    import loralab

    node = loralab.NODE_CLASS_MAPPINGS["LoRALabLoadDataset"]
    assert "validation_images" in node.INPUT_TYPES()["optional"]
    settings, report = node().load(folder="demo", caption_ext="txt", trigger_word="sks", repeats=1,
                                   resolution="64", caption_dropout_rate=0.0, validation_images=2)
    assert settings.section["validation_images"] == 2
    settings, _ = node().load(folder="demo", caption_ext="txt", trigger_word="sks", repeats=1,
                              resolution="64", caption_dropout_rate=0.0)  # a workflow saved without it
    assert resolve({"model": {"path": "m", "family": "flux"},
                    "dataset": settings.section})["dataset"]["validation_images"] == 0


def test_training_refuses_before_loading_when_nothing_is_left_to_train(resolved):
    events = []
    with pytest.raises(DatasetError, match="dataset.validation_images = 6"):
        train(resolved(dataset={"validation_images": 6}), on_event=events.append)
    assert not [e for e in events if e["type"] in ("status", "caching")]  # no model was loaded


# -- the measurement ----------------------------------------------------------------------------

class CountingFamily:
    """training_loss draws from the generator it is given, as a family does, and notes the mode."""

    def __init__(self):
        self.seen = []

    def training_loss(self, model, batch, generator, train_config, guidance_embeds):
        self.seen.append((model.training, torch.is_grad_enabled(), tuple(batch["latents"].shape)))
        return (torch.randn(3, generator=generator) + batch["latents"].mean()).abs().mean()


def held_out_of(family, indices):
    items = scan_of(3).items
    sizes = {0: [(64, 48)], 1: [(64, 48), (32, 32)], 2: [(64, 48)]}
    return HeldOut(family, items, indices, sizes, lambda index, size: torch.full((4, 2, 2), float(index)),
                   lambda texts: (torch.zeros(len(texts), 3, 5), torch.zeros(len(texts), 5)),
                   {}, False, torch.device("cpu"), torch.float32, contextlib.nullcontext)


def test_the_validation_loss_uses_the_same_draws_every_time_in_eval_mode():
    family, model = CountingFamily(), torch.nn.Linear(2, 2)
    held = held_out_of(family, [1, 2])
    first = held.metrics(model)
    assert first == held.metrics(model)  # the same noise: only a changed LoRA changes it
    assert family.seen == [(False, False, (1, 4, 2, 2))] * 6  # 3 cases (image 1 at both sizes)
    assert model.training  # put back as it was
    assert held_out_of(family, [1, 2]).metrics(model) == first  # also after a resume
    assert held_out_of(family, [0, 2]).metrics(model) != first  # other images: another value
    assert held_out_of(family, []).metrics(model) == {}


# -- the plot -----------------------------------------------------------------------------------

def colour_count(image, colour):
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return int((numpy.asarray(image) == rgb).all(axis=-1).sum())


def test_the_loss_plot_draws_the_validation_curve_with_a_legend():
    lines = [{"step": s, "loss": 1 / s} for s in range(5, 100, 5)]
    alone = loss_plot(lines)
    both = loss_plot([{**line, "validation_loss": 0.2 + line["step"] / 200} for line in lines])
    assert colour_count(alone, COLORS[0]) > 100 and colour_count(alone, COLORS[1]) == 0
    assert colour_count(both, COLORS[0]) > 100 and colour_count(both, COLORS[1]) > 100


# -- the sign on made-up curves -----------------------------------------------------------------

def noisy(values, spread, seed=0):
    rng = random.Random(seed)
    return [v + rng.gauss(0, spread) for v in values]


FALLING = noisy([0.3 + 0.5 * math.exp(-i / 8) for i in range(30)], 0.08)
DIP_THEN_RISE = noisy([0.9 - 0.03 * i for i in range(8)] + [0.69 + 0.02 * i for i in range(1, 23)], 0.005)


def first_sign(training, validation):
    """What the monitor sees: the sign judged after every new line; (line count, result)."""
    for count in range(1, len(validation) + 1):
        found = loss_signs.overfitting(training[:count], validation[:count])
        if found:
            return count, found
    return None


def test_validation_rising_while_training_falls_is_overfitting_from_its_lowest_value():
    count, (best, recent, then, now) = first_sign(FALLING, DIP_THEN_RISE)
    assert best == 7 == min(range(count), key=DIP_THEN_RISE.__getitem__)
    assert recent > DIP_THEN_RISE[best] and now < then
    assert count <= 18  # found within ten lines of a steady rise


@pytest.mark.parametrize("seed", range(20))
def test_noise_alone_is_not_overfitting(seed):
    assert first_sign(FALLING, noisy([0.8] * 30, 0.05, seed)) is None


def test_a_rise_of_both_losses_is_not_overfitting():
    assert first_sign([v * 2 for v in DIP_THEN_RISE], DIP_THEN_RISE) is None  # it diverges


def test_a_rise_in_the_last_few_lines_is_not_judged_yet():
    assert loss_signs.overfitting(FALLING[:11], [0.9 - 0.02 * i for i in range(8)] + [0.9, 1.0, 1.1]) is None


def monitor_with_checkpoints(tmp_path, steps):
    run = RunFolder(str(tmp_path), "example")
    os.makedirs(run.path)
    for step in steps:
        open(run.checkpoint(step), "w").close()
    return Monitor(run)


@pytest.mark.parametrize("saved, keep", [((20, 40, 60), 40), ((30, 50, 60), 30), ((60,), 60)])
def test_the_warning_names_the_step_and_the_nearest_saved_checkpoint(tmp_path, saved, keep):
    monitor = monitor_with_checkpoints(tmp_path, saved)
    found = []
    for index, (loss, validation) in enumerate(zip(FALLING, DIP_THEN_RISE)):
        found += monitor.on_log({"step": 5 * (index + 1), "loss": loss, "validation_loss": validation})
    assert len(found) == 1 and "lowest at step 40 " in found[0]  # line 8 of every 5 steps
    assert f"Keep the checkpoint of step {keep}, the saved one nearest step 40 " in found[0]
    assert f"example_{keep:09d}.safetensors" in found[0]


def test_without_a_saved_checkpoint_the_warning_says_how_to_get_one(tmp_path):
    monitor = monitor_with_checkpoints(tmp_path, ())
    found = [w for index, pair in enumerate(zip(FALLING, DIP_THEN_RISE))
             for w in monitor.on_log({"step": index + 1, "loss": pair[0], "validation_loss": pair[1]})]
    assert len(found) == 1 and "No step checkpoint is saved yet" in found[0]


def test_a_resumed_monitor_continues_the_validation_curve(tmp_path):
    run = RunFolder(str(tmp_path), "example")
    os.makedirs(run.path)
    pairs = list(zip(FALLING, DIP_THEN_RISE))
    for index, (loss, validation) in enumerate(pairs[:12]):
        run.append_metrics({"step": index + 1, "loss": loss, "validation_loss": validation})
    monitor = Monitor(run)
    found = [w for index, (loss, validation) in enumerate(pairs[12:20], start=12)
             for w in monitor.on_log({"step": index + 1, "loss": loss, "validation_loss": validation})]
    assert len(found) == 1 and "lowest at step 8 " in found[0]


# -- a real LoRA memorising one image -------------------------------------------------------------

STEPS = 120


@pytest.fixture(scope="module")
def memorising_run(tmp_path_factory):
    """The pretrained shapes model learns "sks" from one image (a green square on white) at a rate
    far too high, while the other ("sks on a blue background") is held out: the LoRA first learns
    what sks is (the validation loss falls), then that sks is always on white (it rises)."""
    root = tmp_path_factory.mktemp("memorise")
    data = root / "data"
    data.mkdir()
    for name, background in (("a", "white"), ("b", "blue")):  # b.png is the one held out
        draw_scene("green", "square", background, size=64, extent=0.7).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"sks on a {background} background")
    config = resolve({
        "name": "memorise", "model": {"path": "builtin:tiny-flux", "dtype": "fp32"},
        "dataset": {"folder": str(data), "resolution": [64], "caption_dropout_rate": 0.5,
                    "validation_images": 1},
        "train": {"steps": STEPS, "lr": 6e-3, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False},
        "save": {"save_every": 20, "max_step_saves_to_keep": 3, "output_dir": str(root / "output")},
        "sample": {"sample_every": 60, "prompts": ["sks on a white background", "sks on a blue background"],
                   "width": 64, "height": 64, "sample_steps": 8},
        "logging": {"performance_log_every": 5}})
    events = []
    result = train(config, on_event=events.append)
    return result, events, RunFolder(config["save"]["output_dir"], config["name"])


def test_a_memorising_run_holds_one_image_out_and_measures_it(memorising_run):
    result, events, run = memorising_run
    assert result.status == "finished"
    stats = json.load(open(run.file("config.json")))["dataset_stats"]
    assert stats["images"] == 1 and stats["validation_images"] == ["b.png"]
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == list(range(5, STEPS + 1, 5))
    assert all(math.isfinite(m["validation_loss"]) for m in metrics)
    lowest = min(m["validation_loss"] for m in metrics)
    assert metrics[-1]["validation_loss"] > 1.5 * lowest  # memorised: the held-out image got worse
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]  # while the trained one got better
    assert os.path.isfile(run.file("loss.png"))


def test_a_memorising_run_warns_of_overfitting_at_its_lowest_validation_step(memorising_run):
    _, events, run = memorising_run
    warnings = [e for e in events if e["type"] == "warning" and "validation loss" in e["message"]]
    assert len(warnings) == 1, [e["message"] for e in events if e["type"] == "warning"]
    warning = warnings[0]
    named = int(re.search(r"lowest at step (\d+) ", warning["message"]).group(1))
    seen = [m for m in run.read_metrics() if m["step"] <= warning["step"]]
    assert named == min(seen, key=lambda m: m["validation_loss"])["step"]
    saved = set()  # the step checkpoints on disk when the warning came
    for event in events[:events.index(warning)]:
        if event["type"] == "checkpoint":
            saved = (saved | {event["step"]}) - set(event["removed"])
    keep = min(saved, key=lambda s: (abs(s - named), s))
    assert f"Keep the checkpoint of step {keep}, the saved one nearest step {named} " in warning["message"]


def test_a_memorising_run_shows_the_sample_signs_of_overfitting(memorising_run):
    result, _, _ = memorising_run
    assert any("nearly a copy of training image a.png" in w for w in result.warnings), result.warnings
    assert any("samples of different prompts look nearly the same" in w for w in result.warnings)
