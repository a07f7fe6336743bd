"""A non-finite loss or gradient skips its update (the weights never see a NaN), is counted in
the metrics, and enough of them in a row stop the run; with several processes every rank skips
and stops together (a NaN on one rank of two, no hang)."""
import json
import os
import textwrap

import torch
from conftest import torchrun

from loralab.core.runs import RunFolder
from loralab.core.trainer import train


def nan_at(steps_with_nan, real_loss):
    """A training_loss that returns NaN (through the graph, so backward runs) at given calls."""
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real_loss(*args, **kwargs)
        return value * float("nan") if calls["n"] in steps_with_nan else value
    return loss


def test_a_nan_step_is_skipped_and_counted_and_the_weights_stay_finite(resolved, monkeypatch):
    from loralab.core.families.flux import FAMILY as flux

    monkeypatch.setattr(flux, "training_loss", nan_at({2, 3}, flux.training_loss))
    config = resolved(train={"steps": 6}, logging={"performance_log_every": 3})
    result = train(config)
    assert result.status == "finished" and result.step == 6
    assert all(torch.isfinite(w).all() for w in result.weights.values())
    metrics = RunFolder(config["save"]["output_dir"], config["name"]).read_metrics()
    assert [(m["step"], m["skipped_steps"]) for m in metrics] == [(3, 2), (6, 2)]
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN in the logged losses


def test_nan_steps_in_a_row_stop_the_run_keeping_the_last_finite_checkpoint(resolved, monkeypatch):
    from loralab.core.families.flux import FAMILY as flux

    monkeypatch.setattr(flux, "training_loss", nan_at(set(range(3, 100)), flux.training_loss))
    config = resolved(train={"steps": 20, "max_nonfinite_steps": 4}, save={"save_every": 2})
    result = train(config)
    assert result.status == "stopped: nan"
    run = RunFolder(config["save"]["output_dir"], config["name"])
    assert run.checkpoints() == [2, 4]  # steps 3-6 skipped: the 4th in a row stops at step 6
    assert result.lora_path == run.checkpoint(4)
    assert any("4 steps in a row" in w for w in result.warnings)
    assert not os.path.exists(run.final_lora)


RANK_ONE_NAN = textwrap.dedent("""
    import os, sys
    from loralab.core.families.flux import FAMILY as flux
    real = flux.training_loss
    calls = {"n": 0}
    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        if os.environ.get("RANK") == "1" and calls["n"] >= 3:  # only the second process
            return value * float("nan")
        return value
    flux.training_loss = loss
    from loralab.cli import main
    sys.exit(main(["train", sys.argv[1]]))
""")


def test_a_nan_on_one_rank_of_two_stops_both_without_a_hang(make_config, tmp_path):
    raw = make_config(name="ddp_nan", train={"steps": 12, "max_nonfinite_steps": 3},
                      save={"save_every": 1})
    config_path, script = tmp_path / "ddp.json", tmp_path / "nan_on_rank_one.py"
    config_path.write_text(json.dumps(raw))
    script.write_text(RANK_ONE_NAN)
    done = torchrun(script, config_path, timeout=240)
    # both processes end with the run's exit status 1 ("stopped: nan"), which torchrun reports
    assert done.returncode == 1 and "exitcode  : 1" in done.stderr, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["status"] == "stopped: nan", done.stdout
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["status"] == "stopped: nan"
    run = RunFolder(raw["save"]["output_dir"], "ddp_nan")
    # rank 1 goes NaN from step 3: both ranks skip steps 3-5 together and stop at step 5
    assert run.checkpoints()[-1] == 4
