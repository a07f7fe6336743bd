"""What LoRA Lab reads back from a run folder is checked before use (issue 20): a damaged
config.json, warnings.json, metrics line or pins.json is named and skipped, never a traceback,
through `loralab runs list` / `runs compare` / `runs pin`, the loss plot, resume and rotation.
Run folders are made by hand: no training needed to damage one."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_cli
from loralab import cli
from loralab.core.runs import RunFolder, choose_run_folder
from loralab.core.runs.plot import loss_plot

CONFIG = {"name": "r", "model": {"path": "/models/FLUX.1-dev", "dtype": "bf16"},
          "dataset": {"folder": "/data"}, "network": {"linear": 4},
          "train": {"lr": 1e-4, "steps": 20}, "save": {"format": "diffusers", "dtype": "fp16"},
          "sample": {"prompts": ["a"]}, "dataset_stats": {"fingerprint": "sha256:abc"}}


def make_run(output, name, config=None, metrics=None, warnings=None):
    """A run folder as training leaves it: config.json, metrics.jsonl, warnings.json; each may be
    given as raw text to damage it."""
    folder = output / name
    folder.mkdir(parents=True)

    def write(file, value):
        (folder / file).write_text(value if isinstance(value, str) else json.dumps(value))

    write("config.json", {**CONFIG, "name": name} if config is None else config)
    write("metrics.jsonl", metrics if metrics is not None else
          "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (5, 10)))
    write("warnings.json", [] if warnings is None else warnings)
    return folder


BAD_METRICS = "\n".join([json.dumps({"step": 5, "loss": 0.5}), json.dumps({"loss": 0.4}),
                         json.dumps({"step": "7", "loss": 0.3}), json.dumps({"step": 8, "loss": "x"}),
                         json.dumps({"step": 9, "loss": 0.2, "gpu_peak_mb": "lots"}),
                         json.dumps({"step": 10, "loss": 0.1})]) + "\n"


def test_runs_list_skips_damaged_files_by_name_and_shows_single_file_runs(tmp_path):
    output = tmp_path / "output"
    make_run(output, "good")
    make_run(output, "from_files", config={**CONFIG, "model": {
        "path": None, "transformer_path": "/models/diffusion_models/flux1-dev.safetensors"}})
    make_run(output, "from_checkpoint", config={**CONFIG, "model": {
        "path": None, "checkpoint_path": "/models/checkpoints/sd_xl_base_1.0.safetensors"}})
    make_run(output, "model_x", config={"model": "x"})
    make_run(output, "a_list", config="[1, 2]")
    make_run(output, "not_json", config="{\"model\": ")
    make_run(output, "bad_lines", metrics=BAD_METRICS, warnings={"not": "a list"})
    result = run_cli("runs", "list", "--output-dir", str(output))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and not line.startswith(("skipped", "damaged", "name"))}
    assert rows["from_files"][3] == "flux1-dev.safetensors"
    assert rows["from_checkpoint"][3] == "sd_xl_base_1.0.safetensors"
    assert rows["bad_lines"][4] == "10/20" and rows["bad_lines"][5] == "0.1000"  # the good lines
    assert set(rows) == {"good", "from_files", "from_checkpoint", "bad_lines"}
    out = result.stdout
    assert f"skipped damaged: {output / 'model_x' / 'config.json'}: model: 'x' is not of type 'object'" in out
    assert f"skipped damaged: {output / 'a_list' / 'config.json'}: top level:" in out
    assert f"{output / 'not_json' / 'config.json'} is not valid JSON: line 1" in out
    assert f"damaged: {output / 'bad_lines' / 'warnings.json'}: top level:" in out
    for line in ("line 2 (top level: 'step' is a required property)", "line 3 (step: '7' is not of type",
                 "line 4 (loss: 'x' is not of type", "line 5 (gpu_peak_mb: 'lots' is not of type"):
        assert line in out


def test_runs_compare_names_damaged_files_and_refuses_a_damaged_config_in_one_line(tmp_path):
    output = tmp_path / "output"
    make_run(output, "a")
    make_run(output, "b", metrics=BAD_METRICS, warnings="not json")
    make_run(output, "c", config={**CONFIG, "sample": {"prompts": "a, b"}})
    done = run_cli("runs", "compare", "a", "b", "--output-dir", str(output), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "b: step 10/20, final loss 0.1000" in done.stdout
    assert f"damaged: {output / 'b' / 'warnings.json'} is not valid JSON" in done.stdout
    assert (tmp_path / "cmp" / "loss.png").is_file()
    refused = run_cli("runs", "compare", "a", "c", "--output-dir", str(output))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (f"error: damaged: {output / 'c' / 'config.json'}: "
                                      "sample/prompts: 'a, b' is not of type 'array'")


def test_the_loss_plot_and_a_resume_skip_bad_metrics_lines(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    make_run(tmp_path, "r", metrics=BAD_METRICS)
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == [5, 10]  # step 9: its gpu_peak_mb is damaged
    assert "line 3 (step: '7'" in run.metrics_problem
    assert loss_plot(metrics).size == (640, 360)  # what the trainer and TrainLoRA draw
    problem = run.truncate_metrics(8)  # what a resume from step 8 does
    assert "line 2 (top level: 'step' is a required property)" in problem
    assert [json.loads(line)["step"] for line in open(run.metrics)] == [5]


def test_a_hand_edited_config_json_is_never_resumed_nor_a_crash(tmp_path):
    make_run(tmp_path, "r", config={"model": "x"})
    run, reason = choose_run_folder(str(tmp_path), "r", CONFIG, resume=True)
    assert run.name == "r-2" and reason == "r holds another run's files but no readable config.json"


def test_one_bad_pin_drops_only_that_pin_and_rotation_keeps_every_pinned_step(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    os.makedirs(run.path)
    for step in (2, 4, 6, 8):
        save_file({"w": np.zeros(1, np.float32)}, run.checkpoint(step))
    with open(run.pins_path, "w") as f:
        json.dump({"steps": [4, "x", None, -1]}, f)
    assert run.pinned() == [4]
    assert 'entries "x", null, -1 are not step numbers' in run.pins_problem
    assert run.rotate(1) == [2, 6] and run.checkpoints() == [4, 8]

    with open(run.pins_path, "w") as f:
        f.write("{\"steps\": [4")  # torn: what is pinned is unknown, so nothing is deleted
    assert run.rotate(0) == [] and run.checkpoints() == [4, 8]
    assert "no checkpoint is rotated away" in run.pins_problem
    assert cli.main(["runs", "pin", run.path, "8"]) == 2  # named, one line, nothing rewritten
    assert open(run.pins_path).read() == "{\"steps\": [4"


def test_a_zero_byte_or_torn_final_lora_is_not_a_finished_run(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    os.makedirs(run.path)
    save_file({"w": np.zeros(4, np.float32)}, run.final_lora)
    assert run.has_final_lora()
    for damaged in (b"", open(run.final_lora, "rb").read()[:20]):
        with open(run.final_lora, "wb") as f:
            f.write(damaged)
        assert not run.has_final_lora()


@pytest.mark.parametrize("name, said", [
    ("r\n", "name = \"r\\n\": must match"),
    ("r" * 300, "name: 300 characters long; must be at most 200"),
])
def test_a_run_name_with_a_newline_or_too_long_is_refused_in_one_line(name, said, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": name, "model": {"path": str(tmp_path / "none"), "family": "flux"},
                                "dataset": {"folder": str(tmp_path / "none")}}))  # nothing to train on
    assert cli.main(["train", str(path)]) == 2
    assert said in capsys.readouterr().err


def test_a_transformer_file_whose_metadata_is_not_json_loads_as_without_it(tiny_flux, tmp_path):
    from safetensors.torch import load_file, save_file as save_torch

    from loralab.core.families.flux.file_layout import transformer_config
    from loralab.core.families.parts.files import AXES_METADATA_KEY, read_header
    from loralab.core.families.flux.tiny import write_comfyui_files

    source = write_comfyui_files(tiny_flux)["transformer"]
    tensors, metadata = read_header(source)
    damaged = str(tmp_path / "damaged.safetensors")
    save_torch(load_file(source), damaged, metadata={**metadata, AXES_METADATA_KEY: "[16, 8"})
    expected = transformer_config(tensors, {k: v for k, v in metadata.items() if k != AXES_METADATA_KEY})
    assert transformer_config(*read_header(damaged)) == expected
