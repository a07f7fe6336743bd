"""train.ema: the saved LoRA holds an EMA of the trained weights, computed here by hand from the
weights of every step of a run without EMA (the EMA must not change the training itself), and a
run killed with SIGKILL and resumed saves the same file bit for bit."""
import json
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loralab.core.config import resolve
from loralab.core.families import get_family
from loralab.core.lora import file_tensors
from loralab.core.runs import RunFolder
from loralab.core.runs.identity import run_identity
from loralab.core.trainer import train
from loralab.core.trainer.checkpoints import load_checkpoint_state

STEPS, DECAY = 5, 0.2  # 0.2: the warm-up's n / (9 + n) is below it at update 2, above it after


def _config(make_config, tmp_path, folder, ema):
    return resolve(make_config(name="ema", train={"steps": STEPS, "ema": ema, "ema_decay": DECAY},
                               save={"save_every": 1, "max_step_saves_to_keep": STEPS, "dtype": "float32",
                                     "output_dir": str(tmp_path / folder)}))


def _by_hand(per_step):
    """diffusers' EMAModel rule, written out in float64: the first update copies the weights,
    the n-th keeps min(decay, n / (9 + n)) of the average."""
    average = None
    for n, weights in enumerate(per_step, 1):
        weights = {k: v.double() for k, v in weights.items()}
        if average is None:
            average = weights
        else:
            keep = min(DECAY, n / (9 + n))
            average = {k: keep * average[k] + (1 - keep) * weights[k] for k in average}
    return average


def _metadata(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_the_saved_lora_is_the_ema_of_each_steps_weights(make_config, tmp_path):
    plain_config = _config(make_config, tmp_path, "plain", ema=False)
    ema_config = _config(make_config, tmp_path, "ema", ema=True)
    plain, averaged = train(plain_config), train(ema_config)
    assert plain.status == averaged.status == "finished"
    plain_run = RunFolder(plain_config["save"]["output_dir"], "ema")
    ema_run = RunFolder(ema_config["save"]["output_dir"], "ema")
    per_step = [load_checkpoint_state(plain_run, step)["lora"] for step in range(1, STEPS + 1)]
    for step in range(1, STEPS + 1):  # the EMA only watches: the same training with it on
        trained = load_checkpoint_state(ema_run, step)["lora"]
        assert all(torch.equal(trained[k], per_step[step - 1][k]) for k in trained), step

    family = get_family(ema_config["model"]["family"])
    expected = file_tensors({k: v.float() for k, v in _by_hand(per_step).items()}, ema_config["network"],
                            ema_config["save"]["format"], "float32", to_diffusers=family.lora_to_diffusers)
    saved, last = load_file(ema_run.final_lora), load_file(plain_run.final_lora)
    assert sorted(saved) == sorted(expected)
    moved = max((last[k] - saved[k]).abs().max().item() for k in saved)
    assert moved > 1e-4, "the EMA file is the last step's weights"
    for key in expected:
        assert torch.allclose(saved[key], expected[key], rtol=1e-5, atol=1e-7), key
    checkpoint = load_file(ema_run.checkpoint(STEPS))  # checkpoints hold the EMA too
    assert all(torch.equal(checkpoint[k], saved[k]) for k in saved)
    assert averaged.weights.keys() == per_step[0].keys()
    assert _metadata(ema_run.final_lora)["loralab_ema_decay"] == str(DECAY)
    assert "loralab_ema_decay" not in _metadata(plain_run.final_lora)


KILL_AT_CHECKPOINT = """
import json, os, signal, sys
from loralab.core.trainer import train
config = json.load(open(sys.argv[1]))
def on_event(event):  # SIGKILL right after step 3's checkpoint: no cleanup, no final save
    if event["type"] == "checkpoint" and event["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
train(config, on_event=on_event)
"""


def test_a_killed_ema_run_resumes_to_the_same_file(make_config, tmp_path):
    reference_config = _config(make_config, tmp_path, "reference", ema=True)
    killed_config = _config(make_config, tmp_path, "killed", ema=True)
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(killed_config))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_AT_CHECKPOINT), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = RunFolder(killed_config["save"]["output_dir"], "ema")
    assert run.resumable() == 3 and not run.has_final_lora()

    events = []
    resumed = train(killed_config, on_event=events.append)
    assert {"type": "resume", "step": 3} in events and resumed.status == "finished"
    reference = RunFolder(reference_config["save"]["output_dir"], "ema")
    train(reference_config)
    for path, reference_path in [(run.final_lora, reference.final_lora),
                                 (run.checkpoint(STEPS), reference.checkpoint(STEPS))]:
        got, want = load_file(path), load_file(reference_path)
        assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys(), path


def test_ema_settings_are_the_runs_identity_only_when_on(resolved):
    off = run_identity(resolved(train={"ema": False, "ema_decay": 0.5}))
    assert "train.ema" not in off and "train.ema_decay" not in off  # runs from before train.ema resume
    on = run_identity(resolved(train={"ema": True, "ema_decay": 0.5}))
    assert on["train.ema"] is True and on["train.ema_decay"] == 0.5


def test_a_skipped_nonfinite_step_leaves_the_ema_alone(make_config, tmp_path, monkeypatch):
    from loralab.core.families.flux import FAMILY as flux
    from test_nonfinite import nan_at

    monkeypatch.setattr(flux, "training_loss", nan_at({3}, flux.training_loss))
    config = _config(make_config, tmp_path, "nan", ema=True)
    assert train(config).status == "finished"
    run = RunFolder(config["save"]["output_dir"], "ema")
    states = {step: load_checkpoint_state(run, step) for step in range(1, STEPS + 1)}
    assert states[STEPS]["ema"]["optimization_step"] == STEPS - 1
    applied = [states[step]["lora"] for step in (1, 2, 4, 5)]  # step 3's update was skipped
    expected = _by_hand(applied)
    assert all(torch.allclose(states[STEPS]["ema_lora"][k].double(), expected[k], rtol=1e-5, atol=1e-7)
               for k in expected)
