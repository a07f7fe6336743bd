"""Training runs end to end: checkpoint rotation, kill-and-resume, interrupt, plans."""
import json
import os

import pytest
import torch

from conftest import run_cli, train_in_processes
from loralab.core.config import resolve
from loralab.core.runs import RunFolder
from loralab.core.trainer import train


def test_rotation_keeps_the_guides_example(tmp_path):
    run = RunFolder(str(tmp_path), "example")
    os.makedirs(run.path)
    for step in range(250, 2001, 250):
        for path in (run.checkpoint(step), run.checkpoint_state(step), run.checkpoint_state_json(step)):
            open(path, "w").close()
        run.rotate(4)
    assert run.checkpoints() == [1250, 1500, 1750, 2000]
    assert sorted(os.listdir(run.path)) == sorted(
        [f"example_{s:09d}{end}" for s in (1250, 1500, 1750, 2000)
         for end in (".safetensors", ".state.safetensors", ".state.json")])


def test_a_run_leaves_exactly_the_rotated_checkpoints(resolved):
    config = resolved(train={"steps": 24, "optimizer": "adamw8bit"},
                      save={"save_every": 3, "max_step_saves_to_keep": 4})
    events = []
    result = train(config, on_event=events.append)
    run = RunFolder(config["save"]["output_dir"], config["name"])
    assert result.status == "finished" and result.step == 24
    assert run.checkpoints() == [15, 18, 21, 24]
    assert all(os.path.isfile(run.checkpoint_state(s)) for s in run.checkpoints())
    assert os.path.isfile(run.final_lora) and os.path.isfile(run.file("loss.png"))
    assert not [f for f in os.listdir(run.path) if f.startswith(".tmp-")]
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 24]
    for line in metrics:
        assert set(line) >= {"step", "loss", "lr", "seconds_per_step", "cpu_peak_mb", "gpu_peak_mb"}
    saved = json.load(open(run.file("config.json")))
    assert saved["train"]["steps"] == 24 and "torch" in saved["versions"]
    assert {e["type"] for e in events} >= {"plan", "start", "step", "log", "checkpoint", "done"}


def test_steps_default_to_the_guides_table(resolved):
    config = resolved(train={"steps": None})
    plans = []
    result = train(config, on_event=lambda e: plans.append(e) if e["type"] == "plan" else None,
                   should_stop=lambda: True)
    assert plans[0]["images"] == 6 and plans[0]["steps"] == 1150  # 6 images: 1000-1500 band
    assert plans[0]["steps_per_epoch"] == 6
    assert result.status == "interrupted" and result.step == 1


def test_interrupt_saves_and_a_rerun_resumes(resolved):
    config = resolved(train={"steps": 12}, save={"save_every": 100})
    stop_at = {"step": 0}

    def count(event):
        if event["type"] == "step":
            stop_at["step"] = event["step"]

    result = train(config, on_event=count, should_stop=lambda: stop_at["step"] >= 5)
    run = RunFolder(config["save"]["output_dir"], config["name"])
    assert result.status == "interrupted" and result.step == 5
    assert run.checkpoints() == [5] and not os.path.exists(run.final_lora)
    events = []
    again = train(config, on_event=events.append)
    assert again.status == "finished" and again.step == 12
    assert {"type": "resume", "step": 5} in events
    assert [m["step"] for m in run.read_metrics()] == [5, 10, 12]
    finished = train(config)
    assert finished.status == "already finished"


def test_gradient_accumulation_batches_and_bf16(resolved):
    config = resolved(train={"steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2,
                             "dtype": "bf16", "optimizer": "adamw8bit", "lr_scheduler": "cosine",
                             "gradient_checkpointing": True},
                      dataset={"resolution": [64, 96], "cache": "disk"}, save={"save_every": 2})
    result = train(config)
    assert result.status == "finished" and result.step == 4
    assert os.path.isdir(os.path.join(result.run_folder, "cache"))


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor", "lion"])
def test_other_optimizers(resolved, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-4
    result = train(resolved(train={"steps": 3, "optimizer": optimizer, "lr": lr}))
    assert result.status == "finished"


# A run killed and trained again reaching the same final LoRA: test_kill_anywhere.py (kills at
# every stage that writes, and a bit-identical LoRA)


def test_cli_train_reports_a_missing_dataset(make_config, tmp_path):
    raw = make_config(dataset={"folder": str(tmp_path / "no-such-folder")})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert "dataset folder not found" in result.stderr and "no-such-folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_a_bad_model_path(make_config, tmp_path):
    raw = make_config(model={"path": str(tmp_path)})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    result = run_cli("train", str(path))
    assert result.returncode == 2 and "model.path" in result.stderr and "model_index.json" in result.stderr


def test_cli_reports_a_file_that_is_not_an_sd_checkpoint_in_one_line(tmp_path):
    """The SDXL/SD1.5 loader's error is the user's too: one line, exit 2, no traceback."""
    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"family": "sd15", "path": str(tmp_path / "model.safetensors")},
                                "dataset": {"folder": "builtin:demo"}, "save": {"output_dir": str(tmp_path)}}))
    result = run_cli("train", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # after the run's progress lines
    assert last.startswith("error: model.path: ") and "model.safetensors" in last


def test_two_processes_train_data_parallel(make_config, tmp_path):
    """torchrun with two CPU processes: accelerate's DDP, the same loop and files as one process."""
    raw = make_config(name="ddp", train={"steps": 4}, save={"save_every": 2})
    result = train_in_processes(raw, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["step"] == 4 and reports[0]["status"] == "finished"
    run = RunFolder(resolve(raw)["save"]["output_dir"], "ddp")
    assert run.checkpoints() == [2, 4] and os.path.isfile(run.final_lora)
    assert [m["step"] for m in run.read_metrics()] == [4]  # one writer: the main process


def test_another_rank_starts_a_new_run_folder_and_says_why(resolved):
    config = resolved(train={"steps": 2}, save={"save_every": 1})
    first = train(config, should_stop=lambda: True)
    events = []
    changed = resolved(train={"steps": 2}, save={"save_every": 1}, network={"linear": 4})
    second = train(changed, on_event=events.append)
    assert second.status == "finished" and second.run_folder == first.run_folder + "-2"
    assert any(e["type"] == "status" and "network.linear 16 -> 4" in e["message"] for e in events)
    assert RunFolder(*os.path.split(first.run_folder)).checkpoints() == [1]  # the old run is untouched


def test_out_of_memory_says_what_to_change_and_leaves_the_model_clean(resolved, monkeypatch):
    """A GPU cannot run out of memory here, so the family's loss raises what CUDA would raise."""
    from loralab.core.families.flux import FAMILY as flux
    from loralab.core.trainer import OutOfMemory

    config = resolved(train={"steps": 3, "batch_size": 2}, dataset={"resolution": [1024]},
                      network={"linear": 64})
    pipeline = flux.load(config["model"])

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(flux, "training_loss", out_of_memory)
    with pytest.raises(OutOfMemory) as error:
        train(config, pipeline=pipeline)
    message = str(error.value)
    assert "Tried to allocate 2.00 GiB" in message
    for advice in ("train.gradient_checkpointing", "dataset.resolution", "train.batch_size 1",
                   "model.quantize", "network.linear", "resumes from the newest checkpoint"):
        assert advice in message
    assert not getattr(pipeline.transformer, "peft_config", None)  # the LoRA was taken off
    monkeypatch.undo()
    assert train(resolved(train={"steps": 1}), pipeline=pipeline).status == "finished"
