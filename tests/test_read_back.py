"""What the project reads back, it checks (issue 20): a resume state is checked against the model
and the optimizer before use (shapes, dtypes, finite values, plain values' types), and a damaged
one is skipped by name for the one before it, never a crash or a NaN LoRA; weights that are not
finite are never written; cached latents and embeddings read from disk are checked and rebuilt.
Real trainings of the tiny FLUX model (tests/conftest.py), a few steps each."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli
from loralab.core.runs import RunFolder
from loralab.core.trainer import NonFiniteWeights, ResumeError, train
from loralab.core.trainer.checkpoints import write_lora


@pytest.fixture
def trained(resolved):
    """A run of 4 steps with checkpoints at 2 and 4, and the config that resumes it to 6."""
    def make(**sections):
        config = resolved(train={"steps": 4}, save={"save_every": 2}, **sections)
        train(config)
        more = {**sections, "train": {**sections.get("train", {}), "steps": 6}}
        return resolved(save={"save_every": 2}, **more), RunFolder(config["save"]["output_dir"], config["name"])
    return make


def damage(run, step, tensors=None, data=None):
    """Rewrites step `step`'s resume state with `tensors(dict)` and `data(dict)` applied to its
    tensors and JSON, keeping the token that ties the two files: damage, not a torn save."""
    with safe_open(run.checkpoint_state(step), framework="pt") as f:
        metadata, values = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    if tensors:
        tensors(values)
    save_file(values, run.checkpoint_state(step), metadata=metadata)
    if data:
        document = json.load(open(run.checkpoint_state_json(step)))
        data(document)
        json.dump(document, open(run.checkpoint_state_json(step), "w"))


def all_nan(values):
    for key, value in values.items():
        if value.is_floating_point():
            values[key] = torch.full_like(value, float("nan"))


def finite_file(path):
    return all(torch.isfinite(v).all() for v in load_file(path).values())


def test_a_wrong_optimizer_state_shape_is_skipped_by_name_not_a_segfault(trained, make_config):
    """Old: exit 139 (fused AdamW read past a 1-element exp_avg_sq) at the first resumed step."""
    config, run = trained()

    def shrink(values):
        for key in [k for k in values if k.endswith("/exp_avg_sq")]:
            values[key] = torch.zeros(1)
    damage(run, 4, shrink)
    path = os.path.join(config["save"]["output_dir"], "resume.json")
    raw = make_config(train={"steps": 6}, save={"save_every": 2})
    with open(path, "w") as f:
        json.dump(raw, f)
    done = run_cli("train", path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from step 2" in done.stdout + done.stderr
    warning = next(line for line in done.stderr.splitlines() if line.startswith("warning:"))
    assert "step 4" in warning and "exp_avg_sq" in warning and "shape [1]" in warning
    assert finite_file(run.final_lora) and "Traceback" not in done.stderr


def test_a_nan_resume_state_is_skipped_and_the_lora_stays_finite(trained):
    """Old: "finished", no warnings, and a LoRA that was NaN in every tensor."""
    config, run = trained()
    damage(run, 4, all_nan)
    result = train(config)
    assert result.status == "finished" and result.step == 6
    assert len(result.warnings) == 1 and "step 4" in result.warnings[0]
    assert "NaN" in result.warnings[0] and "resuming from step 2 instead" in result.warnings[0]
    assert all(torch.isfinite(w).all() for w in result.weights.values())
    assert finite_file(run.final_lora) and finite_file(run.checkpoint(6))


def test_a_nan_final_state_is_not_already_finished_with_nan_weights(trained, resolved):
    """Old: "already finished", handing back the NaN weights of the last state."""
    config, run = trained()
    damage(run, 4, all_nan)
    result = train(resolved(train={"steps": 4}, save={"save_every": 2}))
    assert result.status == "finished" and "step 4" in result.warnings[0]
    assert all(torch.isfinite(w).all() for w in result.weights.values())
    assert finite_file(run.final_lora)


def test_when_no_state_fits_training_starts_from_step_0_with_a_warning(trained):
    config, run = trained()
    damage(run, 4, all_nan)
    damage(run, 2, data=lambda d: d["scheduler"].update(last_epoch="two"))
    events = []
    result = train(config, on_event=events.append)
    assert result.status == "finished" and result.step == 6
    assert not [e for e in events if e["type"] == "resume"]
    assert "step 4" in result.warnings[0] and "step 2" in result.warnings[1]
    assert "scheduler/last_epoch is 'two'" in result.warnings[1]
    assert "training starts from step 0" in result.warnings[1]
    assert [m["step"] for m in run.read_metrics()] == [5, 6]  # the old lines past step 0 are gone
    assert finite_file(run.final_lora)


@pytest.mark.parametrize("what, edit, said", [
    ("a LoRA tensor's shape", dict(tensors=lambda v: v.update({
        next(k for k in v if k.startswith("lora/")): torch.zeros(1, 1)})), "has shape [1, 1]"),
    ("a LoRA tensor's dtype", dict(tensors=lambda v: v.update({
        k: v[k].half() for k in [next(k for k in v if k.startswith("lora/"))]})), "torch.float16"),
    ("the parameters' numbering", dict(data=lambda d: d["optimizer"]["param_groups"][0]["params"].reverse()),
     "params are not this run's"),
    ("a learning rate edited to a string", dict(data=lambda d: d["optimizer"]["param_groups"][0].update(
        lr="fast")), "param_groups/0/lr is 'fast'"),
])
def test_a_damaged_state_is_skipped_for_the_one_before_never_blamed_on_network_settings(
        trained, what, edit, said):
    """Old: "trained with other network settings" (shape, dtype) or a traceback (a string lr)."""
    config, run = trained()
    damage(run, 4, **edit)
    result = train(config)
    assert result.status == "finished" and result.step == 6, what
    assert len(result.warnings) == 1 and "step 4" in result.warnings[0], what
    assert said in result.warnings[0] and "resuming from step 2" in result.warnings[0], what


def test_other_network_settings_are_still_named_as_such(trained, resolved, tmp_path):
    config, run = trained()
    other = resolved(name="rank8", network={"linear": 8, "linear_alpha": 8}, train={"steps": 2},
                     save={"save_every": 2, "output_dir": str(tmp_path / "other")})
    train(other)
    other_run = RunFolder(other["save"]["output_dir"], "rank8")
    for step in (2, 4):  # a rank-8 state where this rank-16 run's are
        shutil.copy(other_run.checkpoint_state(2), run.checkpoint_state(step))
        document = json.load(open(other_run.checkpoint_state_json(2)))
        json.dump({**document, "step": step}, open(run.checkpoint_state_json(step), "w"))
    with pytest.raises(ResumeError, match=r"other network settings \(rank \[8\], this config's \[16\]\)"):
        train(config)


# -- weights that are not finite are never written ------------------------------------------------

def test_weights_that_are_not_finite_in_the_file_dtype_are_never_written(trained):
    """A state whose weights are finite in float32 but not in float16 (beyond 65504) resumes; the
    save at step 6 is refused before any file of it is written, the checkpoint of step 4 kept.
    Old: a LoRA file of inf written and the run "finished"."""
    config, run = trained()
    damage(run, 4, lambda v: v.update({k: t * 1e7 for k, t in v.items() if k.startswith("lora/")}))
    with pytest.raises(NonFiniteWeights, match="float16") as refused:
        train(config)
    assert run.checkpoint(6) in str(refused.value)
    assert run.checkpoints() == [2, 4] and not os.path.exists(run.checkpoint_state(6))
    assert not os.path.exists(run.final_lora) or finite_file(run.final_lora)


def test_write_lora_refuses_nan(resolved, tmp_path):
    weights = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((2, 4), float("nan")),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2)}
    path = str(tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteWeights, match="NaN or inf"):
        write_lora(path, weights, resolved(network={"linear": 2, "linear_alpha": 2}), 1)
    assert not os.path.exists(path)


# -- the latent and text cache on disk -----------------------------------------------------------

def test_nan_latents_planted_in_the_disk_cache_are_encoded_again_and_named(trained):
    """Old: every step's loss was NaN, so its update was skipped without a warning, and the run
    "finished" with the weights of step 4 saved as step 6's."""
    config, run = trained(dataset={"cache": "disk"})
    planted, caption_planted = [], False
    for root, _, names in sorted(os.walk(os.path.join(run.path, "cache"))):
        for name in sorted(names):
            path = os.path.join(root, name)
            value = torch.load(path, weights_only=True)
            if isinstance(value, torch.Tensor):  # a latent [C, h, w]
                torch.save(torch.full_like(value, float("nan")), path)
            elif not caption_planted:  # one caption's (embeddings, pooled), wherever it comes
                caption_planted = True
                torch.save((value[0], torch.zeros(3)), path)
            else:
                continue
            planted.append(path)
    assert len(planted) == 7  # six latents, one caption
    before = load_file(run.checkpoint_state(4))
    result = train(config)
    assert result.status == "finished" and result.step == 6
    named = [path for path in planted if any(path in w and "encoded again" in w for w in result.warnings)]
    assert named == planted
    assert sum("holds NaN or inf" in w for w in result.warnings) == 6
    assert any("unlike the others" in w for w in result.warnings)
    assert run.read_metrics()[-1]["skipped_steps"] == 0
    after = load_file(run.checkpoint_state(6))
    assert not torch.equal(before["lora/transformer_blocks.0.attn.to_q.lora_B.weight"],
                           after["lora/transformer_blocks.0.attn.to_q.lora_B.weight"])
