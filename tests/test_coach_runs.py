"""The Monitor's thresholds on real (tiny) training runs: runs made to fail raise their sign,
a healthy run raises none. Then the experiment notebook on the same runs: run folders,
`loralab runs list`, `loralab runs compare` and the CompareRuns node.

The runs (tiny FLUX, 64 px, 40 steps, a metrics line every step, samples every 10 steps):
- healthy: lr 1e-3 with adamw (high for FLUX.1 but right for the tiny random model);
- lr0: lr 0, so the LoRA cannot change: the loss stays flat and the samples stay the base's;
- lr_high: lr 1.0 with adamw: the loss jumps in the first steps."""
import json
import os

import pytest
from PIL import Image

from conftest import FAST, merge, run_cli
from loralab.core.config import resolve
from loralab.core.families import get_family
from loralab.core.trainer import train

PROMPTS = ["a photo of [trigger]", "a red car on a street"]


@pytest.fixture(scope="module")
def runs(tiny_flux, demo_dataset, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("runs") / "output")  # as CompareRuns finds it headless: ./output
    pipeline = get_family("flux").load({"path": tiny_flux, "dtype": "fp32"}, "none")
    results = {}
    for name, lr in (("healthy", 1e-3), ("lr0", 0.0), ("lr_high", 1.0)):
        config = resolve(merge(FAST, {
            "name": name, "model": {"path": tiny_flux}, "dataset": {"folder": demo_dataset},
            "train": {"lr": lr, "steps": 40},
            "save": {"output_dir": output, "save_every": 1000},
            "sample": {"sample_every": 10, "prompts": PROMPTS},
            "logging": {"performance_log_every": 1}}))
        results[name] = train(config, pipeline=pipeline)
    return output, results


def signs(result):
    text = "\n".join(result.warnings)
    return {sign for sign, phrase in (("flat", "has not gone down"), ("up", "the loss went up"),
                                      ("spike", "the loss jumped"), ("unchanged", "look the same as the base"),
                                      ("prompts", "different prompts"), ("memorized", "nearly a copy"),
                                      ("blurry", "blurrier"), ("noisy", "noisier"), ("nan", "NaN"))
            if phrase in text}


def test_healthy_run_is_silent(runs):
    result = runs[1]["healthy"]
    assert result.status == "finished" and result.warnings == []


def test_lr0_run_flat_loss_and_samples_identical_to_base(runs):
    assert signs(runs[1]["lr0"]) == {"flat", "unchanged"}


def test_lr_far_too_high_run_shows_loss_jumps(runs):
    assert "spike" in signs(runs[1]["lr_high"])
    assert "unchanged" not in signs(runs[1]["lr_high"])


def test_warnings_reach_the_run_folder_and_the_summary(runs):
    from loralab.core.coach.summary import run_summary
    from loralab.core.runs import RunFolder

    output, results = runs
    result = results["lr0"]
    with open(os.path.join(result.run_folder, "warnings.json")) as f:
        assert json.load(f) == result.warnings
    summary = run_summary(result, RunFolder(output, "lr0").read_metrics())
    assert "2 warning(s)" in summary and "has not gone down" in summary
    assert "6 images" in summary and "steps per epoch" in summary


def test_run_folder_holds_what_repeats_the_run(runs, demo_dataset):
    from loralab.core.dataset import scan_folder
    from loralab.core.runs.fingerprint import dataset_fingerprint

    folder = runs[1]["healthy"].run_folder
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["train"]["seed"] == 42 and config["sample"]["seed"] == 42
    assert config["versions"]["torch"] and config["train"]["steps"] == 40
    fingerprint = config["dataset_stats"]["fingerprint"]
    assert fingerprint == dataset_fingerprint(scan_folder(demo_dataset, "txt", "sks"))
    for name in ("metrics.jsonl", "loss.png", "warnings.json", "samples/000000040/00_s1.png"):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_fingerprint_changes_with_images_and_captions(tmp_path, demo_dataset):
    import shutil

    from loralab.core.dataset import scan_folder
    from loralab.core.runs.fingerprint import dataset_fingerprint

    copy = shutil.copytree(demo_dataset, tmp_path / "copy")
    before = dataset_fingerprint(scan_folder(str(copy)))
    assert before == dataset_fingerprint(scan_folder(demo_dataset))  # the folder does not count
    (copy / "image_000.txt").write_text("another caption")
    assert dataset_fingerprint(scan_folder(str(copy))) != before


def test_runs_list_command(runs):
    output = runs[0]
    result = run_cli("runs", "list", "--output-dir", output)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "date", "model", "steps", "final", "loss", "best", "loss", "warnings"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"healthy", "lr0", "lr_high"}
    assert rows["healthy"][4] == "40/40" and rows["healthy"][-1] == "0" and rows["lr0"][-1] == "2"


def test_runs_compare_command(runs, tmp_path):
    output = runs[0]
    result = run_cli("runs", "compare", "healthy", os.path.join(output, "lr0"),
                     "--output-dir", output, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "train.lr: healthy: 0.001; lr0: 0.0" in result.stdout
    assert "dataset_stats.fingerprint" not in result.stdout  # same data: not a difference
    with Image.open(tmp_path / "samples.png") as samples, Image.open(tmp_path / "loss.png") as loss:
        # a column per run; a row per prompt at the 5 sampled steps spread to 4 (0, 10, 30, 40)
        assert samples.width > 2 * 64 and samples.height >= 8 * 64 and loss.size == (640, 360)


def test_runs_compare_names_a_missing_run(runs):
    result = run_cli("runs", "compare", "healthy", "nope", "--output-dir", runs[0])
    assert result.returncode == 2 and "no run folder 'nope'" in result.stderr


def test_compare_node(runs, monkeypatch):
    from loralab.nodes.compare import LoRALabCompareRuns

    output = runs[0]
    monkeypatch.chdir(os.path.dirname(output))
    node = LoRALabCompareRuns()
    loss, samples, text = node.compare(runs="", output_dir="", names="healthy, lr_high")
    assert loss.shape == (1, 360, 640, 3) and 0.0 <= float(loss.min()) and float(loss.max()) <= 1.0
    assert samples.shape[0] == 1 and samples.shape[3] == 3
    assert "train.lr: healthy: 0.001; lr_high: 1.0" in text
    assert "lr0: 0.0" in node.compare(runs="healthy\nlr0", output_dir="", names="")[2]
