"""The run plan is computed once (core/coach/run_plan.py), and everything that shows it agrees: on
a dataset with held-out images (dataset.validation_images) and regularization images, `loralab
plan` (a real subprocess), LoadDataset's report, the trainer's "plan" event and the run summary
give the same steps and steps per epoch, and these are what the trainer's batches hold."""
import json
import os
import re

import pytest

import loralab
from conftest import run_cli
from loralab.core.coach.summary import run_summary
from loralab.core.config import resolve
from loralab.core.dataset import BatchPlan
from loralab.core.demo.dataset import make_demo_dataset, make_shapes_dataset
from loralab.core.trainer import train

IMAGES, HELD_OUT, REGULARIZATION, RATIO = 7, 2, 4, 0.5
# 5 training images and round(5 x 0.5) = 2 regularization entries per epoch: 7 entries, at batch 2
# 4 steps per epoch; the guide's steps for 5 images (1125) times 1 + 0.5
ENTRIES, STEPS, STEPS_PER_EPOCH = 7, round(1125 * 1.5), 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return (make_demo_dataset(str(root / "stars"), count=IMAGES, size=(64, 64)),
            make_shapes_dataset(str(root / "shapes"), count=REGULARIZATION, size=64))


def dataset_section(folders):
    return {"folder": folders[0], "trigger_word": "sks", "resolution": [64],
            "validation_images": HELD_OUT, "regularization_folder": folders[1],
            "regularization_ratio": RATIO}


def numbers_of(text):
    """(steps, steps per epoch) as a plan report or a summary says them."""
    per_epoch = re.search(r"steps per epoch = .* / batch \d+ = (\d+); epochs = (\d+) / (\d+)", text)
    assert per_epoch, text
    assert per_epoch.group(1) == per_epoch.group(3)
    return int(per_epoch.group(2)), int(per_epoch.group(1))


def test_plan_report_trainer_and_summary_agree(folders, tiny_flux, tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_INPUT", os.path.dirname(folders[0]))
    raw = {"name": "agree", "model": {"path": tiny_flux, "dtype": "fp32"},
           "dataset": dataset_section(folders),
           "train": {"batch_size": 2, "dtype": "fp32", "optimizer": "adamw", "gradient_checkpointing": False},
           "sample": {"sample_every": 0}, "save": {"output_dir": str(tmp_path / "output")}}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    cli = run_cli("plan", folders[0], "--config", str(tmp_path / "config.json"))
    assert cli.returncode == 0, cli.stderr
    assert "held out for the validation loss: 2" in cli.stdout and "regularization images: 4" in cli.stdout
    assert numbers_of(cli.stdout) == (STEPS, STEPS_PER_EPOCH)

    node = loralab.NODE_CLASS_MAPPINGS["LoRALabLoadDataset"]()  # names inside the input folder
    section = {**dataset_section(folders), "folder": "stars", "regularization_folder": "shapes"}
    _, report = node.load(**{**section, "resolution": "64", "caption_ext": "txt", "repeats": 1,
                             "caption_dropout_rate": 0.05, "regularization_weight": 1.0})
    # the node knows only the dataset: at the default batch 1, a step per entry
    assert numbers_of(report) == (STEPS, ENTRIES)

    plans = []
    result = train(resolve(raw), on_event=lambda e: plans.append(e) if e["type"] == "plan" else None,
                   should_stop=lambda: True)
    plan, = plans
    assert (plan["steps"], plan["steps_per_epoch"]) == (STEPS, STEPS_PER_EPOCH)
    assert (plan["images"], plan["validation_images"], plan["regularization_images"]) == (5, 2, 4)
    assert result.steps == STEPS
    assert numbers_of(run_summary(result, [])) == (STEPS, STEPS_PER_EPOCH)

    # what the trainer's batches hold per epoch is what the plan counted
    sizes = {i: [(64, 64)] for i in range(IMAGES + REGULARIZATION)}
    training = {i: sizes[i] for i in range(IMAGES) if i not in (1, 5)}  # 2 held out of 7
    batches = BatchPlan(training, 1, 2, seed=0, ratio=RATIO,
                        regularization={i: sizes[i] for i in range(IMAGES, IMAGES + REGULARIZATION)})
    assert len(batches.epoch(0)) == plan["steps_per_epoch"]
    assert sum(len(batch) for batch in batches.epoch(0)) == plan["entries_per_epoch"] == ENTRIES
