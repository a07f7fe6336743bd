"""A run is what it says it is: one run folder per training (a changed setting or resume false
starts a new folder, the old one untouched), a lock against two trainings in one folder, atomic
and durable writes with ordinary file modes, no pickle from the run folder, broken resume states
refused by name, torn metrics lines dropped, pinned checkpoints and exported runs. Real files and
real optimizers on small tensors; no model loads."""
import copy
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from loralab import cli
from loralab.core.runs import RunFolder, RunLocked, atomic_path, choose_run_folder, write_json
from loralab.core.io.atomic import TEMPORARY
from loralab.core.runs.history import export_run, find_runs, read_run
from loralab.core.trainer.checkpoints import (StateError, load_checkpoint_state, load_resume_state,
                                              save_checkpoint, write_lora)
from loralab.core.trainer.optimizers import make_optimizer, make_scheduler

CONFIG = {
    "name": "r",
    "model": {"family": "flux", "path": "/models/FLUX.1-dev", "transformer_path": None,
              "clip_l_path": None, "t5_path": None, "vae_path": None, "dtype": "bf16", "quantize": "none"},
    "dataset": {"folder": "/data/a", "caption_ext": "txt", "trigger_word": "sks", "repeats": 1,
                "resolution": [512], "caption_dropout_rate": 0.05, "cache": "memory"},
    "network": {"linear": 2, "linear_alpha": 2},
    "train": {"steps": 8, "batch_size": 1, "gradient_accumulation_steps": 1, "lr": 0.0004,
              "optimizer": "adamw", "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_grad_norm": 1.0,
              "dtype": "bf16", "gradient_checkpointing": False, "seed": 42, "timestep_type": "sigmoid",
              "guidance": 1.0, "resume": True},
    "save": {"dtype": "float16", "format": "diffusers", "save_every": 2, "max_step_saves_to_keep": 2,
             "output_dir": "unused"},
    "sample": {"sample_every": 0, "prompts": ["a photo of sks"]},
    "logging": {"performance_log_every": 2},
    "dataset_stats": {"images": 2, "fingerprint": "sha256:" + "ab" * 32},
}


def configured(**changes):
    config = copy.deepcopy(CONFIG)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"blocks.0.to_q.lora_A.weight": torch.randn(2, 4, generator=generator),
            "blocks.0.to_q.lora_B.weight": torch.randn(4, 2, generator=generator)}


def trained(optimizer_name="adamw", steps=2, lr=1e-3):
    parameters = [torch.nn.Parameter(w.clone()) for w in weights().values()]
    optimizer = make_optimizer(optimizer_name, parameters, lr)
    scheduler = make_scheduler("cosine", optimizer, 1, 10)
    for step in range(steps):
        loss = sum((p * (step + 1)).sin().sum() for p in parameters)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return parameters, optimizer, scheduler


def start(output, config, resume=None):
    """What the trainer does at a run's start: choose the folder, lock it, clean, write config."""
    run, reason = choose_run_folder(str(output), config["name"], config, resume)
    with run.lock():
        run.clean_temporaries()
        run.write_config(config)
    return run, reason


def finish(run, config, steps=(2, 4)):
    """A run's files: checkpoints with resume state, metrics, the final LoRA."""
    parameters, optimizer, scheduler = trained()
    for step in steps:
        save_checkpoint(run, step, weights(step), optimizer, scheduler, config)
        run.append_metrics({"step": step, "loss": 1.0 / step})
        run.rotate(config["save"]["max_step_saves_to_keep"])
    write_lora(run.final_lora, weights(9), config, steps[-1])


def snapshot(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


# -- one run folder, one training ---------------------------------------------------------------

def test_a_changed_setting_starts_a_new_folder_and_leaves_the_old_one_untouched(tmp_path):
    first, reason = start(tmp_path, CONFIG)
    assert first.name == "r" and reason is None
    finish(first, CONFIG)
    before = snapshot(first.path)

    again, reason = choose_run_folder(str(tmp_path), "r", CONFIG, True)
    assert again.path == first.path and reason is None  # the same settings: resume / finished

    changed = configured(train__lr=0.001)
    second, reason = start(tmp_path, changed)
    assert second.name == "r-2" and second.path == str(tmp_path / "r-2")
    assert reason == "settings differ from run r: train.lr 0.0004 -> 0.001"
    finish(second, changed)
    assert snapshot(first.path) == before  # bytes and times of every file of the first run
    saved = json.load(open(second.config_path))
    assert saved["train"]["lr"] == 0.001 and saved["started_because"] == reason
    assert saved["identity"]["train.lr"] == 0.001 and "train.resume" not in saved["identity"]

    # back to the first settings: the first folder again; a third change: r-3, compared to r-2
    assert choose_run_folder(str(tmp_path), "r", CONFIG, True)[0].path == first.path
    assert choose_run_folder(str(tmp_path), "r", changed, True)[0].path == second.path
    third, reason = choose_run_folder(str(tmp_path), "r", configured(network__linear=4), True)
    assert third.name == "r-3"
    assert reason == "settings differ from run r-2: network.linear 2 -> 4; train.lr 0.001 -> 0.0004"


@pytest.mark.parametrize("change, same", [
    ({"train__steps": 20}, True),                  # more steps continue the run
    ({"sample__prompts": ["x"]}, True),
    ({"logging__performance_log_every": 7}, True),
    ({"save__save_every": 5}, True),
    ({"dataset__folder": "/elsewhere"}, True),     # same images and captions: the fingerprint decides
    ({"dataset__cache": "disk"}, True),
    ({"train__gradient_checkpointing": True}, True),
    ({"model__path": "/models/other"}, False),
    ({"model__quantize": "fp8"}, False),
    ({"dataset__trigger_word": "ohwx"}, False),
    ({"dataset_stats__fingerprint": "sha256:" + "cd" * 32}, False),
    ({"network__linear_alpha": 1}, False),
    ({"train__seed": 1}, False),
    ({"train__optimizer": "prodigy"}, False),
    ({"save__dtype": "bfloat16"}, False),
    ({"save__format": "kohya"}, False),
])
def test_which_settings_make_another_run(tmp_path, change, same):
    start(tmp_path, CONFIG)
    run, reason = choose_run_folder(str(tmp_path), "r", configured(**change), True)
    assert (run.name == "r") is same, (change, reason)
    if not same:
        key = next(iter(change)).replace("__", ".").replace("dataset_stats.", "dataset.")
        assert reason.startswith("settings differ from run r: " + key)


def test_fewer_steps_than_a_run_has_trained_start_a_new_folder(tmp_path):
    killed, _ = start(tmp_path, CONFIG)  # configured for 8 steps, killed after its step 4 checkpoint
    parameters, optimizer, scheduler = trained()
    save_checkpoint(killed, 4, weights(4), optimizer, scheduler, CONFIG)
    assert choose_run_folder(str(tmp_path), "r", configured(train__steps=6), True)[0].name == "r"
    assert choose_run_folder(str(tmp_path), "r", configured(train__steps=4), True)[0].name == "r"
    run, reason = choose_run_folder(str(tmp_path), "r", configured(train__steps=3), True)
    assert run.name == "r-2" and reason.startswith("train.steps 3: run r, with the same settings, has trained 4")
    write_lora(killed.final_lora, weights(9), CONFIG, 8)  # finished: 8 steps trained
    assert choose_run_folder(str(tmp_path), "r", configured(train__steps=6), True)[0].name == "r-2"
    assert choose_run_folder(str(tmp_path), "r", configured(train__steps=80), True)[0].name == "r"


def test_steps_count_with_a_decaying_schedule(tmp_path):
    cosine = configured(train__lr_scheduler="cosine")
    start(tmp_path, cosine)
    run, reason = choose_run_folder(str(tmp_path), "r", configured(train__lr_scheduler="cosine", train__steps=9), True)
    assert run.name == "r-2" and reason == "settings differ from run r: train.steps 8 -> 9"


def test_resume_false_starts_a_new_folder(tmp_path):
    first, _ = start(tmp_path, CONFIG)
    finish(first, CONFIG)
    before = snapshot(first.path)
    fresh = configured(train__resume=False)
    second, reason = start(tmp_path, fresh)
    assert second.name == "r-2" and reason.startswith("train.resume is false") and "r keep" in reason
    third, _ = start(tmp_path, fresh)
    assert third.name == "r-3"
    assert snapshot(first.path) == before
    # resume false in an empty output folder is just the first run
    run, reason = choose_run_folder(str(tmp_path / "other"), "r", fresh, False)
    assert run.path == str(tmp_path / "other" / "r") and reason is None


def test_a_folder_without_a_config_is_reused_and_gaps_are_seen(tmp_path):
    os.makedirs(tmp_path / "r" / "cache")  # stopped before its config.json: nothing to keep
    run, reason = choose_run_folder(str(tmp_path), "r", CONFIG, True)
    assert run.name == "r" and reason is None
    start(tmp_path, CONFIG)
    lr = configured(train__lr=0.002)
    third = RunFolder(str(tmp_path), "r-3")  # r-2 deleted by the user, r-3 kept
    third.identity = None
    third.write_config(lr)
    assert choose_run_folder(str(tmp_path), "r", lr, True)[0].name == "r-3"
    assert choose_run_folder(str(tmp_path), "r", configured(train__lr=0.003), True)[0].name == "r-2"


def test_runs_list_says_why_a_run_was_started(tmp_path, capsys):
    first, _ = start(tmp_path, CONFIG)
    start(tmp_path, configured(train__lr=0.001))
    runs = find_runs(str(tmp_path))
    assert [run.name for run in runs] == ["r", "r-2"]
    assert runs[1].identity["train.lr"] == 0.001 and "identity" not in runs[1].config
    assert runs[0].started_because is None and "started_because" not in runs[1].config
    assert cli.main(["runs", "list", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "r-2: started because settings differ from run r: train.lr 0.0004 -> 0.001" in out


# -- two processes, one folder --------------------------------------------------------------------

HOLD = """
import sys, time
from loralab.core.runs import RunFolder
with RunFolder(sys.argv[1], "r").lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_training_of_one_folder_is_refused_and_a_kill_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = RunFolder(str(tmp_path), "r")
        with pytest.raises(RunLocked) as refused:
            with run.lock():
                pytest.fail("two holders of one run folder")
        assert run.path in str(refused.value) and f"process {holder.pid}" in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run.lock():  # the kill released it
        with pytest.raises(RunLocked):
            with RunFolder(str(tmp_path), "r").lock():  # a second holder in this process, too
                pass
    with run.lock():  # and a finished holder releases it
        pass


# -- files on disk ----------------------------------------------------------------------------------

def test_files_get_ordinary_modes_under_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run, _ = start(tmp_path, CONFIG)
        finish(run, CONFIG)
        with atomic_path(run.file("loss.png")) as temporary:
            open(temporary, "wb").write(b"png")
        for name in os.listdir(run.path):
            if os.path.isfile(run.file(name)):
                assert os.stat(run.file(name)).st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        write_json(run.file("warnings.json"), [])
        assert os.stat(run.file("warnings.json")).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            open(temporary, "w").write("half")
            raise RuntimeError("killed")
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]


def test_leftover_temporaries_are_removed_at_start(tmp_path):
    run = start(tmp_path, CONFIG)[0]  # the run folder, started once (a folder with no run is not taken)
    os.makedirs(run.file("samples", "000000002"))
    os.makedirs(run.file("cache"))
    left = [run.file(".tmp-0123456789ab-r_000000002.state.safetensors"),
            run.file("cache", ".tmp-a1b2c3d4e5f6-latent.safetensors")]
    kept = [run.file(".tmp-notours"), run.file("samples", "000000002", "00_s1.png"), run.file("notes.txt")]
    for path in left + kept:
        open(path, "w").close()
    # what atomic_path names its temporaries is what clean_temporaries removes
    with atomic_path(run.file("x.json")) as temporary:
        assert TEMPORARY.match(os.path.basename(temporary))
    assert start(tmp_path, CONFIG)[0].path == run.path
    assert not any(os.path.exists(path) for path in left)
    assert all(os.path.exists(path) for path in kept)


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    for step in (2, 4):
        run.append_metrics({"step": step, "loss": 0.5})
    with open(run.metrics, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    assert [m["step"] for m in run.read_metrics()] == [2, 4]
    assert "metrics.jsonl: line 3" in run.metrics_problem and "dropped" in run.metrics_problem
    assert read_run_safe(run)["metrics_problem"] == run.metrics_problem
    run.append_metrics({"step": 6, "loss": 0.4})  # a restart appends: the new line stays whole
    assert [m["step"] for m in run.read_metrics()] == [2, 4, 6]
    assert run.truncate_metrics(4) is not None  # the resume rewrite drops the torn line for good
    assert [m["step"] for m in run.read_metrics()] == [2, 4] and run.metrics_problem is None


def read_run_safe(run):
    with open(run.config_path, "w") as f:
        json.dump(CONFIG, f)
    record = read_run(run.path)
    return {"metrics_problem": record.metrics_problem}


# -- resume state: no pickle, broken ones refused by name ---------------------------------------------

class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_never_executed(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    os.makedirs(run.path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"step": 2, "lora": Planted(str(marker))})
    assert not marker.exists()
    # an old-style .state.pt beside a LoRA file, and the same bytes where the new state lives
    save_file(weights(), run.checkpoint(2))
    open(run.legacy_checkpoint_state(2), "wb").write(payload)
    save_file(weights(), run.checkpoint(4))
    open(run.checkpoint_state(4), "wb").write(payload)
    open(run.checkpoint_state_json(4), "wb").write(payload)
    found, warnings = load_resume_state(run)
    assert found is None and not marker.exists()
    assert "r_000000004.state.json" in warnings[0] and "cannot be loaded" in warnings[0]
    assert "r_000000002.state.pt" in warnings[1] and "not loaded" in warnings[1]
    pickle.loads(payload)["lora"].close()  # the payload is live: loading it would have made the marker
    assert marker.exists()


def test_a_broken_state_is_refused_by_name_and_the_one_before_resumes(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    parameters, optimizer, scheduler = trained()
    for step in (2, 4, 6):
        save_checkpoint(run, step, weights(step), optimizer, scheduler, CONFIG)
    with open(run.checkpoint_state(6), "r+b") as f:  # torn tensors file
        f.truncate(os.path.getsize(run.checkpoint_state(6)) // 2)
    data = json.load(open(run.checkpoint_state_json(4)))
    save_checkpoint(run, 4, weights(4), optimizer, scheduler, CONFIG)  # a new token for step 4's tensors ...
    json.dump(data, open(run.checkpoint_state_json(4), "w"))            # ... beside an old JSON
    for step, why in ((6, "cannot be loaded"), (4, "different saves")):
        with pytest.raises(StateError) as refused:
            load_checkpoint_state(run, step)
        assert f"r_{step:09d}.state.json" in str(refused.value) and why in str(refused.value)
    (step, state), warnings = load_resume_state(run)
    assert step == 2 and len(warnings) == 2 and "step 6" in warnings[0] and "step 4" in warnings[1]
    assert all(torch.equal(state["lora"][k], v) for k, v in weights(2).items())
    assert state["lora"]["blocks.0.to_q.lora_A.weight"].dtype == torch.float32
    os.remove(run.checkpoint_state_json(2))
    assert run.resumable() == 6 and load_resume_state(run)[0] is None
    with pytest.raises(StateError, match="is missing"):
        load_checkpoint_state(run, 2)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy", "adafactor", "lion"])
def test_optimizer_state_round_trips(tmp_path, name):
    lr = 1.0 if name == "prodigy" else 1e-3
    parameters, optimizer, scheduler = trained(name, steps=3, lr=lr)
    run = RunFolder(str(tmp_path), "r")
    lora = {f"p{i}": p.detach().clone() for i, p in enumerate(parameters)}
    save_checkpoint(run, 3, lora, optimizer, scheduler, CONFIG)
    assert not [f for f in os.listdir(run.path) if f.endswith(".pt")]
    state = load_checkpoint_state(run, 3)

    fresh = [torch.nn.Parameter(state["lora"][f"p{i}"].clone()) for i in range(len(parameters))]
    resumed = make_optimizer(name, fresh, lr)
    resumed_scheduler = make_scheduler("cosine", resumed, 1, 10)
    resumed.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    assert_same(resumed.state_dict(), optimizer.state_dict())
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    for params, opt, sched in ((parameters, optimizer, scheduler), (fresh, resumed, resumed_scheduler)):
        (params[0].sin().sum() + params[1].cos().sum()).backward()
        opt.step()
        sched.step()
    for a, b in zip(parameters, fresh):  # the next step is the one an unbroken run takes
        assert torch.equal(a, b), name


def assert_same(a, b, where="state"):
    assert type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


# -- pin and export ----------------------------------------------------------------------------------

def test_a_pinned_checkpoint_survives_rotation(tmp_path):
    run, _ = start(tmp_path, CONFIG)
    parameters, optimizer, scheduler = trained()
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(run, step, weights(step), optimizer, scheduler, CONFIG)
        if step == 4:
            assert cli.main(["runs", "pin", run.path, "4"]) == 0
        run.rotate(2)
    assert run.checkpoints() == [4, 8, 10] and run.pinned() == [4]
    assert run.has_state(4) and not os.path.exists(run.checkpoint_state(6))
    assert cli.main(["runs", "pin", run.path, "6"]) == 2  # rotated away: nothing to pin
    run.pin(4, pinned=False)
    run.rotate(2)
    assert run.checkpoints() == [8, 10] and run.pinned() == []


def test_export_writes_one_folder(tmp_path, capsys):
    run, _ = start(tmp_path / "output", CONFIG)
    finish(run, CONFIG, steps=(2, 4, 6))
    for step in (0, 2, 6):
        os.makedirs(run.samples(step))
        open(os.path.join(run.samples(step), "00_s1.png"), "wb").write(b"png%d" % step)
    open(run.file("loss.png"), "wb").write(b"plot")
    write_json(run.file("warnings.json"), ["w"])

    out = tmp_path / "final"
    assert cli.main(["runs", "export", "r", str(out), "--output-dir", str(tmp_path / "output")]) == 0
    assert sorted(os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files) == [
        "config.json", "loss.png", "metrics.jsonl", "r.safetensors", "samples/000000000/00_s1.png",
        "samples/000000002/00_s1.png", "samples/000000006/00_s1.png", "warnings.json"]
    assert open(out / "r.safetensors", "rb").read() == open(run.final_lora, "rb").read()

    copied = export_run(run.path, 4, str(tmp_path / "step4"))
    names = sorted(os.path.relpath(path, tmp_path / "step4") for path in copied)
    assert "r_000000004.safetensors" in names and "samples/000000006/00_s1.png" not in names
    assert "samples/000000002/00_s1.png" in names

    assert cli.main(["runs", "export", run.path, "4", str(out)]) == 2  # not an empty folder
    assert cli.main(["runs", "export", run.path, "2", str(tmp_path / "x")]) == 2  # rotated away
    assert "no step 2 checkpoint" in capsys.readouterr().err


def test_what_a_kill_inside_a_save_or_a_rotation_leaves_is_removed(tmp_path):
    run = RunFolder(str(tmp_path), "r")
    os.makedirs(run.path)
    left = [run.file(".tmpGoN0Pt"),  # safetensors' own temporary inside save_file
            run.file("r_000000001.state.safetensors"), run.file("r_000000001.state.json")]  # no LoRA
    kept = [run.file("r_000000003.safetensors"), run.file("r_000000003.state.safetensors"),
            run.file("r_000000003.state.json"), run.file(".tmpnotours-at-all")]
    for path in left + kept:
        open(path, "w").close()
    assert sorted(run.clean_temporaries()) == sorted(left)
    assert sorted(os.listdir(run.path)) == sorted(os.path.basename(p) for p in kept)
