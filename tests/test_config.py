"""The one schema: the guide's defaults, and an error for every bad value that names the key."""
import json

import pytest

from conftest import run_cli
from loralab.core.config import (ConfigError, defaults, epochs, field, load_config,
                                 recommended_steps, resolve, step_band, steps_per_epoch)


def test_defaults_are_the_guides():
    d = defaults()
    assert d["network"]["linear"] == 16
    assert d["train"]["batch_size"] == 1 and d["dataset"]["repeats"] == 1
    assert d["train"]["lr"] == 1e-4 and d["train"]["optimizer"] == "adamw8bit"
    assert d["save"]["dtype"] == "float16" and d["save"]["save_every"] == 250
    assert d["save"]["max_step_saves_to_keep"] == 4
    assert d["logging"]["performance_log_every"] == 10
    assert d["dataset"]["caption_dropout_rate"] == 0.05
    assert d["train"]["steps"] is None  # chosen from the dataset size
    assert d["train"]["timestep_type"] == "sigmoid" and d["train"]["guidance"] == 1.0


def test_resolve_fills_alpha_and_format():
    config = resolve({"model": {"family": "flux", "path": "m"}, "dataset": {"folder": "d"},
                      "network": {"linear": 8}})
    assert config["network"]["linear_alpha"] == 8
    assert config["save"]["format"] == "diffusers"
    assert field("train.batch_size")["minimum"] == 1


def test_guides_worked_example():
    assert steps_per_epoch(30) == 30 and epochs(1800, 30) == 60
    assert steps_per_epoch(30, repeats=2) == 60 and epochs(1800, 30, repeats=2) == 30


@pytest.mark.parametrize("images, low, high", [(5, 1000, 1500), (20, 1000, 1500), (35, 1500, 2500),
                                               (50, 1500, 2500), (80, 2500, None)])
def test_recommended_steps_follow_the_guides_table(images, low, high):
    assert step_band(images) == (low, high)
    steps = recommended_steps(images)
    assert steps >= low and (high is None or steps <= high)


BASE = {"model": {"path": "m"}, "dataset": {"folder": "d"}}


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "batch_size", 0, "train.batch_size = 0: must be at least 1"),
    ("train", "batch_size", "two", 'train.batch_size = "two": must be of type integer'),
    ("train", "lr", -1, "train.lr = -1: must be at least 0"),
    ("train", "optimizer", "sgd", 'train.optimizer = "sgd": must be one of "adamw8bit"'),
    ("train", "steps", 0, "train.steps = 0: must be at least 1"),
    ("train", "timestep_type", "uniform", "train.timestep_type"),
    ("network", "linear", 0, "network.linear = 0: must be at least 1"),
    ("network", "linear_alpha", 0, "network.linear_alpha = 0: must be greater than 0"),
    ("dataset", "repeats", 0, "dataset.repeats = 0: must be at least 1"),
    ("dataset", "caption_dropout_rate", 1.5, "dataset.caption_dropout_rate = 1.5: must be at most 1.0"),
    ("dataset", "resolution", [], "dataset.resolution: needs at least 1 item"),
    ("save", "dtype", "int8", 'save.dtype = "int8": must be one of "float16"'),
    ("save", "max_step_saves_to_keep", 0, "save.max_step_saves_to_keep = 0: must be at least 1"),
    ("sample", "sample_every", -1, "sample.sample_every = -1: must be at least 0"),
    ("model", "family", "sd3", 'model.family = "sd3": must be one of'),
    ("train", "nonsense", 1, "train: unknown key nonsense"),
])
def test_every_bad_value_names_its_key(section, key, value, expected):
    raw = json.loads(json.dumps(BASE))
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as error:
        resolve(raw)
    assert expected in str(error.value)


def test_missing_sections_and_keys():
    with pytest.raises(ConfigError, match="model is missing"):
        resolve({"dataset": {"folder": "d"}})
    with pytest.raises(ConfigError, match="dataset.folder is missing"):
        resolve({"model": {"path": "m"}, "dataset": {}})


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {"path": "m"},\n "dataset": }')
    with pytest.raises(ConfigError, match="line 2") as error:
        load_config(str(broken))
    assert str(broken) in str(error.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "absent.json"))


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"family": "flux", "path": "models/flux"},
                                "dataset": {"folder": "data"}}))
    config = load_config(str(path))
    assert config["model"]["path"] == str(tmp_path / "models" / "flux")
    assert config["dataset"]["folder"] == str(tmp_path / "data")


def test_cli_refuses_a_bad_config_before_loading_anything(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"path": "/nowhere"}, "dataset": {"folder": "/nowhere"},
                                "train": {"batch_size": 0, "lr": 5}}))
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert "train.batch_size = 0: must be at least 1" in result.stderr
    assert "train.lr = 5: must be at most 1.0" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
