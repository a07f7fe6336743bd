"""The experiment notebook on made-up run folders (no training): listing, differences, loss
curves and samples side by side, and the errors that name what is missing."""
import json
import os

import pytest
from PIL import Image

from loralab.core.runs.compare import compare_runs, flatten, sample_rows, setting_differences
from loralab.core.runs.history import RunNotFound, find_runs, locate_run, read_run, runs_table


def make_run(output, name, lr=1e-4, losses=(1.0, 0.8, 0.9), sample_steps=(0, 10, 20),
             prompts=("a", "b"), warnings=()):
    folder = output / name
    folder.mkdir(parents=True)
    config = {"name": name, "model": {"path": "/models/FLUX.1-dev", "dtype": "bf16"},
              "train": {"lr": lr, "steps": 20, "seed": 42}, "sample": {"prompts": list(prompts)},
              "dataset_stats": {"fingerprint": "sha256:abc", "buckets": [[64, 64]]}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "loss": loss}) + "\n" for i, loss in enumerate(losses)))
    (folder / "warnings.json").write_text(json.dumps(list(warnings)))
    for step in sample_steps:
        (folder / "samples" / f"{step:09d}").mkdir(parents=True)
        for index in range(len(prompts)):
            Image.new("RGB", (32, 32), (step * 10 % 256, index * 100, 50)).save(
                folder / "samples" / f"{step:09d}" / f"{index:02d}_s1.png")
    return str(folder)


def test_flatten_and_differences():
    a = {"name": "a", "train": {"lr": 1e-4, "steps": 20}, "dataset": {"resolution": [512, 1024]}}
    b = {"name": "b", "train": {"lr": 4e-4, "steps": 20}, "dataset": {"resolution": [512]}, "extra": 1}
    assert flatten(a) == {"name": "a", "train.lr": 1e-4, "train.steps": 20, "dataset.resolution": [512, 1024]}
    assert setting_differences([a, b]) == [("dataset.resolution", [[512, 1024], [512]]),
                                           ("extra", [None, 1]), ("train.lr", [1e-4, 4e-4])]
    assert setting_differences([a, dict(a, name="c")]) == []  # the name alone is no difference


def test_read_run_numbers(tmp_path):
    run = read_run(make_run(tmp_path, "r", losses=(1.0, 0.7, float("nan")), warnings=["w"]))
    assert run.name == "r" and run.model == "FLUX.1-dev" and run.steps == 20 and run.last_step == 30
    assert run.best_loss == 0.7 and run.final_loss != run.final_loss  # the final NaN is shown as is
    assert run.sample_steps() == [0, 10, 20] and len(run.sample_paths(10)) == 2


def test_list_table(tmp_path):
    make_run(tmp_path, "first", warnings=["one", "two"])
    make_run(tmp_path, "second", losses=())
    (tmp_path / "not_a_run").mkdir()
    table = runs_table(find_runs(str(tmp_path))).splitlines()
    assert table[0].split() == ["name", "date", "model", "steps", "final", "loss", "best", "loss", "warnings"]
    assert table[1].split()[0] == "first" and table[1].split()[-3:] == ["0.9000", "0.8000", "2"]
    assert table[2].split()[-3:] == ["-", "-", "0"]
    assert find_runs(str(tmp_path / "nothing")) == []


def test_locate_run_by_path_or_name(tmp_path):
    path = make_run(tmp_path, "r")
    assert locate_run("r", str(tmp_path)) == path == locate_run(path, "elsewhere")
    with pytest.raises(RunNotFound, match="no run folder 'x'.*runs list"):
        locate_run("x", str(tmp_path))


def test_compare_text_images_and_samples_at_matching_steps(tmp_path):
    a = make_run(tmp_path, "a", lr=1e-4, sample_steps=(0, 10, 20), warnings=["flat loss"])
    b = make_run(tmp_path, "b", lr=4e-4, sample_steps=(0, 10, 20))
    comparison = compare_runs([a, b])
    text = comparison.text()
    assert "train.lr: a: 0.0001; b: 0.0004" in text and "fingerprint" not in text
    assert "a: step 30/20, final loss 0.9000, best 0.8000, 1 warning(s)" in text and "  - flat loss" in text
    assert comparison.loss_image.size == (640, 360)
    # 3 matching steps x 2 prompts as rows, 2 runs as columns (32 px cells, a label column)
    width, height = comparison.samples_image.size
    assert height >= 6 * 32 and width == max(120, 32) + 2 * 32


def test_compare_adds_the_last_samples_when_runs_end_at_different_steps(tmp_path):
    a = make_run(tmp_path, "a", sample_steps=(0, 10, 20))
    b = make_run(tmp_path, "b", sample_steps=(0, 10, 30), prompts=("one",))
    rows, labels = sample_rows([read_run(a), read_run(b)])
    assert labels == ["step 0: a", "step 10: a", "last (20, 30): a"]  # one prompt in common
    assert all(len(row) == 2 for row in rows)


def test_compare_spreads_many_steps_over_a_few_rows(tmp_path):
    steps = tuple(range(0, 100, 10))
    runs = [read_run(make_run(tmp_path, name, sample_steps=steps, prompts=("p",))) for name in "ab"]
    assert sample_rows(runs)[1] == ["step 0: p", "step 30: p", "step 60: p", "step 90: p"]


def test_compare_without_samples_has_no_sample_image(tmp_path):
    a = make_run(tmp_path, "a", sample_steps=())
    b = make_run(tmp_path, "b")
    assert compare_runs([a, b]).samples_image is None


def test_same_names_in_different_output_folders_get_distinct_labels(tmp_path):
    a = make_run(tmp_path / "one", "r")
    b = make_run(tmp_path / "two", "r", lr=1e-3)
    assert compare_runs([a, b]).labels == ["r (1)", "r (2)"]


def test_compare_node_needs_two_runs(tmp_path, monkeypatch):
    from loralab.nodes.compare import LoRALabCompareRuns

    monkeypatch.chdir(tmp_path)  # headless, the node's output folder is ./output
    make_run(tmp_path / "output", "a")
    with pytest.raises(ValueError, match="at least two runs"):
        LoRALabCompareRuns().compare(runs="", output_dir="", names="a")


def test_compare_node_without_samples_returns_a_note_image(tmp_path, monkeypatch):
    from loralab.nodes.compare import LoRALabCompareRuns

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "output" / "sweep", "a", sample_steps=())
    make_run(tmp_path / "output" / "sweep", "b", sample_steps=())
    loss, samples, text = LoRALabCompareRuns().compare(runs="", output_dir="sweep", names="a,b")
    assert samples.shape == (1, 48, 480, 3) and "settings: identical" in text
    assert os.path.isdir(tmp_path / "output" / "sweep" / "a")
