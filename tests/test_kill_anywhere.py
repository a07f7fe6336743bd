"""kill -9 anywhere: one training is SIGKILLed again and again, at random moments and at moments
picked by what appears in its run folder (a save's `.tmp-` temporary: a save in progress), then
run to the end. After every kill each kept checkpoint must load, and in the end the LoRA must be
bit for bit the one an uninterrupted run trains.

The rule checked after each kill is the one core/trainer/checkpoints.py states: the resume state
(.state.safetensors, then .state.json) is written before the LoRA file, each atomically, so a step
checkpoint whose LoRA file exists is complete: its LoRA file loads, and so does its resume state
(load_checkpoint_state, no StateError). A resume state whose LoRA file is missing does not count
(RunFolder.checkpoints() does not list it) and is not checked.

How this test fails when saving breaks (reasoned, not run): were save_checkpoint to write the
LoRA file first, or write any file in place instead of through atomic_path, the kills that fire
when a save's temporary appears land between the files (or inside one), and the check after that
kill finds a listed checkpoint whose state is missing or torn. Were the resume to lose anything
(RNG draws, optimizer or scheduler state, float32 weights), torch.equal on the final LoRA fails.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loralab.core.config import resolve
from loralab.core.runs import RunFolder
from loralab.core.trainer.checkpoints import load_checkpoint_state

NAME = "kill"
STEPS, SAVE_EVERY, KEEP = 30, 1, 2


def _env():
    return {k: v for k, v in os.environ.items() if k != "LORALAB_COMFYUI"}


class Launch:
    """`loralab train CONFIG` as a subprocess, its stderr in a file (read to see training start)."""

    def __init__(self, config_path, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "loralab.cli", "train", config_path],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=_env())

    def training_started(self):
        with open(self.log_path) as f:
            return "training steps" in f.read()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()
        self.log.close()

    def finish(self, timeout=240):
        out, _ = self.process.communicate(timeout=timeout)
        self.log.close()
        with open(self.log_path) as f:
            return self.process.returncode, out, f.read()


def _temporaries(run):
    if not os.path.isdir(run.path):
        return set()
    return {name for name in os.listdir(run.path) if name.startswith(".tmp-")}


def _wait(launch, fired, deadline_s=120):
    """Polls until fired() says so (True: kill now) or the process ends (False)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if fired():
            return True
        if launch.process.poll() is not None:
            return False
        # a save's temporary lives a few milliseconds: look every 0.2 ms (a spin would take a core
        # from the run being killed and from the other test worker)
        time.sleep(0.0002)
    raise AssertionError(f"nothing to kill on within {deadline_s}s; log: {launch.log_path}")


def _check_folder(run, after):
    """What must hold in the run folder at any moment a kill can leave it in."""
    for step in run.checkpoints():
        load_file(run.checkpoint(step))  # the LoRA file users keep loads
        assert run.has_state(step), f"{after}: step {step}'s LoRA file exists but its resume state does not"
        state = load_checkpoint_state(run, step)  # StateError if torn, mismatched or missing
        assert state["step"] == step and state["lora"], after
    if os.path.isfile(run.config_path):
        with open(run.config_path, encoding="utf-8") as f:
            assert isinstance(json.load(f), dict), after
    if os.path.isfile(run.metrics):
        with open(run.metrics, encoding="utf-8") as f:
            text = f.read()
        complete, _, _torn = text.rpartition("\n")  # a kill mid-append may tear only the last line
        for line in filter(str.strip, complete.split("\n")):
            assert isinstance(json.loads(line), dict), f"{after}: metrics line {line!r}"


def _metadata(path):
    """A LoRA file's metadata, less the output folder its config names (the runs differ in it)."""
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata.pop("loralab_config"))
    config["save"].pop("output_dir")
    return metadata, config


def _assert_same_lora(path, reference_path):
    tensors, reference = load_file(path), load_file(reference_path)
    assert sorted(tensors) == sorted(reference), path
    for key in reference:
        assert tensors[key].dtype == reference[key].dtype and torch.equal(tensors[key], reference[key]), \
            f"{path}: {key} differs from the uninterrupted run's"
    assert _metadata(path) == _metadata(reference_path), path


def test_kill_anywhere_then_the_rerun_trains_the_same_lora(make_config, tmp_path):
    def write_config(folder):
        raw = make_config(name=NAME, train={"steps": STEPS},
                          save={"save_every": SAVE_EVERY, "max_step_saves_to_keep": KEEP,
                                "output_dir": str(tmp_path / folder)})
        path = tmp_path / f"{folder}.json"
        path.write_text(json.dumps(raw))
        return str(path), RunFolder(resolve(raw)["save"]["output_dir"], NAME)

    # -- the uninterrupted reference, timed: the random kill moments are scaled to its pace ----------
    reference_path, reference = write_config("reference")
    launch = Launch(reference_path, str(tmp_path / "reference.log"))
    assert _wait(launch, launch.training_started)
    training_began = time.monotonic()
    startup_s = training_began - launch.started
    code, out, log = launch.finish()
    assert code == 0, log[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    step_s = (time.monotonic() - training_began) / STEPS
    assert reference.checkpoints() == [STEPS - SAVE_EVERY * i for i in reversed(range(KEEP))]

    # -- the same config in another folder, killed again and again --------------------------------------
    killed_path, run = write_config("killed")
    rng = random.Random(7)
    # One kill in each stage that writes: ("tmp", pattern): as soon as a new temporary whose final
    # name matches appears, i.e. in that file's save: a checkpoint's three files in their order,
    # and the first write of a launch (config.json, or the resumed metrics); ("startup", f):
    # f * the reference's start-up time after launch (imports, model load, resume, cleaning);
    # ("train", f): f * 40% of the remaining steps' time after training starts (so the run never
    # finishes early), anywhere in a step. The last kill lands while the final LoRA is written;
    # the rerun must then finish from the last step checkpoint.
    kills = [("tmp", r"\.state\.safetensors$"), ("tmp", r"\.state\.json$"),
             ("tmp", rf"{NAME}_\d{{9}}\.safetensors$"), ("tmp", r""),
             ("startup", rng.uniform(0.3, 1.0)), ("train", rng.random())]
    rng.shuffle(kills)
    kills.append(("tmp", rf"-{NAME}\.safetensors$"))

    mid_save, newest = [], -1
    for number, (kind, value) in enumerate(kills, 1):
        remaining = STEPS - (run.resumable() or 0)
        before = _temporaries(run)  # a killed save's leftovers, until the next run cleans them
        launch = Launch(killed_path, str(tmp_path / f"killed-{number}.log"))
        if kind == "tmp":
            pattern = re.compile(value)
            fired = lambda: any(pattern.search(name) for name in _temporaries(run) - before)  # noqa: E731
        elif kind == "startup":
            moment = launch.started + value * startup_s
            fired = lambda: time.monotonic() >= moment  # noqa: E731
        else:
            assert _wait(launch, launch.training_started), f"kill {number}: the run ended before training"
            moment = time.monotonic() + value * 0.4 * remaining * step_s
            fired = lambda: time.monotonic() >= moment  # noqa: E731
        assert _wait(launch, fired), f"kill {number} ({kind} {value}): the run ended first; {launch.log_path}"
        launch.kill()

        after = f"after kill {number} ({kind} {value})"
        _check_folder(run, after)
        if _temporaries(run) - before:
            mid_save.append(number)  # killed before the save's rename: truly mid-save
        resumable = run.resumable()
        assert resumable is None or resumable >= newest, f"{after}: the newest complete checkpoint went back"
        newest = -1 if resumable is None else resumable
        print(f"kill {number} ({kind} {value}): resumable {resumable}, left {sorted(os.listdir(run.path)) if os.path.isdir(run.path) else []}")

    assert len(mid_save) >= 2, f"only kills {mid_save} landed mid-save"

    # -- the rerun finishes the run: the same LoRA, the same kept checkpoints, the same files ------------
    code, out, log = Launch(killed_path, str(tmp_path / "killed-final.log")).finish()
    assert code == 0, log[-3000:]
    assert "resuming from step" in log
    assert json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    _check_folder(run, "after the rerun")
    _assert_same_lora(run.final_lora, reference.final_lora)
    assert run.checkpoints() == reference.checkpoints()
    for step in reference.checkpoints():
        _assert_same_lora(run.checkpoint(step), reference.checkpoint(step))
    assert [m["step"] for m in run.read_metrics()] == [m["step"] for m in reference.read_metrics()]
    assert run.metrics_problem is None
    # nothing left over: no temporaries (ours or safetensors' own `.tmpXXXXXX`), no resume
    # state of a rotated-out step: the run's start cleans what a kill left
    assert not _temporaries(run)
    assert sorted(os.listdir(run.path)) == sorted(os.listdir(reference.path))
