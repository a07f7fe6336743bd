"""The run-folder rules seen through train() itself: same settings resume (or are "already
finished" with every file as it was), a changed setting or resume false trains in a new folder
and says why, a broken newest state resumes from the one before, a held folder is refused."""
import json
import os

import pytest

from loralab.core.coach.summary import run_summary
from loralab.core.runs import RunFolder, RunLocked
from loralab.core.trainer import train


def snapshot(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name == ".lock":  # held by whichever training checks the folder
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def test_a_run_folder_holds_one_training(resolved):
    settings = dict(save={"save_every": 2})
    first = train(resolved(train={"steps": 4}, **settings))
    assert first.status == "finished"
    before = snapshot(first.run_folder)
    assert train(resolved(train={"steps": 4}, **settings)).status == "already finished"
    assert snapshot(first.run_folder) == before  # config.json included: nothing rewritten

    longer = train(resolved(train={"steps": 6}, **settings))  # more steps: the same training, on
    assert longer.run_folder == first.run_folder and longer.step == 6
    before = snapshot(first.run_folder)

    events = []
    changed = train(resolved(train={"steps": 6, "lr": 2e-3}, **settings), on_event=events.append)
    assert changed.status == "finished" and changed.run_folder == first.run_folder + "-2"
    assert any("train.lr 0.001 -> 0.002" in e.get("message", "") for e in events)
    with open(os.path.join(changed.run_folder, "config.json")) as f:
        assert "train.lr 0.001 -> 0.002" in json.load(f)["started_because"]
    assert "a new run folder, because" in run_summary(changed, [])  # TrainLoRA's summary says it
    assert snapshot(first.run_folder) == before  # the old run is never touched
    fresh = train(resolved(train={"steps": 6, "resume": False}, **settings))
    assert fresh.run_folder == first.run_folder + "-3"

    run = RunFolder(*os.path.split(first.run_folder))
    os.remove(run.final_lora)
    with open(run.file(f"{run.name}_000000006.state.safetensors"), "wb") as f:
        f.write(b"torn")
    events = []
    again = train(resolved(train={"steps": 6}, **settings), on_event=events.append)
    assert {"type": "resume", "step": 4} in events and again.status == "finished"
    assert any(e["type"] == "warning" and "000000006" in e["message"] for e in events)

    with run.lock():  # another training holds the folder
        with pytest.raises(RunLocked, match=run.path):
            train(resolved(train={"steps": 8}, **settings))
