"""The demo as shipped learns what it shows: `loralab run quickstart` (a real subprocess, the
shipped workflow) trains the magenta star "sks" on the pretrained shapes model, and the pictures
measured over several seeds (core/demo/score.py) show the star where sks is prompted far
more often than the base model does, while "a red circle on a white background" stays a red
circle (the quickstart trains with preservation, train.preservation_class "shape").

The same thresholds fail a broken trainer: a run at learning rate 0, and a run whose target has
its sign flipped. Both train in-process with the shipped config file's settings."""
import json
import os

import pytest

from conftest import run_cli
from loralab.core.demo.score import FILE, summary_lines
from loralab.core.config import load_config
from loralab.core.families.parts import flow
from loralab.core.trainer import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.json")
WORKFLOW = os.path.join(os.path.dirname(CONFIG), "..", "workflows", "quickstart.json")

# Measured on the shipped quickstart (README, "Quickstart"), 8 seeds: stars base 0%, LoRA 75%;
# red circle still red on white and round: base 100%, LoRA 100%. Without preservation the
# circle kept its red in 75% but its form in 12%: the star's outline bled into it.
STAR_AT_LEAST, BASE_STAR_AT_MOST, ROUND_AT_LEAST = 0.4, 0.125, 0.75


def learned(scores):
    """The demo's verdict: the star far more often than the base, and the red circle still a red
    circle."""
    return (scores["lora"]["star"] >= STAR_AT_LEAST and scores["base"]["star"] <= BASE_STAR_AT_MOST
            and scores["lora"]["red_circle"] >= ROUND_AT_LEAST)


@pytest.fixture(scope="module")
def shipped_quickstart(tmp_path_factory):
    """`loralab run quickstart` as a user runs it: (its output, the run folder's demo scores)."""
    folder = tmp_path_factory.mktemp("demo")
    # torch's own thread count, as a user's shell has it, when this run has the machine to itself
    # (2 min 23 s on 2 threads, 3 min on one); beside another test worker, conftest's one thread,
    # so neither waits on the other's core. And the demo's 8 scoring seeds (conftest's 2 are for
    # runs that test plumbing): its verdict
    alone = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1
    env = {k: v for k, v in os.environ.items()
           if k != "LORALAB_COMFYUI" and (k != "OMP_NUM_THREADS" or not alone)}
    env["LORALAB_DEMO_SEEDS"] = "8"
    done = run_cli("run", "quickstart", cwd=folder, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_folder = folder / "output" / "quickstart"
    with open(run_folder / FILE, encoding="utf-8") as f:
        return done, run_folder, json.load(f)


def test_the_shipped_quickstart_learns_the_star_and_keeps_the_red_circle_red(shipped_quickstart):
    done, _, scores = shipped_quickstart
    assert learned(scores), scores
    # more magenta too (measured 10.5% -> 11.3% of the pixels: preservation keeps the star small)
    assert scores["lora"]["magenta"] > scores["base"]["magenta"], scores
    assert scores["base"]["red_circle"] >= 0.75, scores  # the base draws the circle round


def test_the_run_summary_reports_concept_and_bleed(shipped_quickstart):
    done, run_folder, scores = shipped_quickstart
    concept, bleed = summary_lines(str(run_folder))
    assert concept in done.stdout and bleed in done.stdout
    assert f"LoRA {scores['lora']['star']:.0%} of pictures" in concept


def test_both_quickstarts_train_the_same_demo():
    """configs/quickstart.json (loralab train) and the workflow: same model, data and prompts."""
    config = load_config(CONFIG)
    with open(WORKFLOW, encoding="utf-8") as f:
        nodes = {node["class_type"]: node["inputs"] for node in json.load(f).values()}
    model, data, lora = nodes["LoRALabLoadBaseModel"], nodes["LoRALabLoadDataset"], nodes["LoRALabConfigureLoRA"]
    assert (model["path"], data["folder"], data["trigger_word"]) == (
        config["model"]["path"], config["dataset"]["folder"], config["dataset"]["trigger_word"]) == (
        "builtin:tiny-flux", "builtin:demo", "sks")
    assert [int(data["resolution"])] == config["dataset"]["resolution"]
    assert data["caption_dropout_rate"] == config["dataset"]["caption_dropout_rate"]
    train = config["train"]
    assert (lora["steps"], lora["lr"], lora["linear"], lora["optimizer"], lora["timestep_type"], lora["seed"],
            lora["preservation_class"], lora["preservation_weight"]) == (
        train["steps"], train["lr"], config["network"]["linear"], train["optimizer"], train["timestep_type"],
        train["seed"], train["preservation_class"], train["preservation_weight"])
    assert train["preservation_class"] == "shape"
    assert lora["sample_prompts"].split("\n") == config["sample"]["prompts"]
    assert nodes["LoRALabSampleGrid"]["prompts"].split("\n") == config["sample"]["prompts"]
    assert nodes["LoRALabSampleGrid"]["strengths"] == "0,0.5,1"


def quickstart_config(tmp_path, **train_changes):
    config = load_config(CONFIG)
    config["save"]["output_dir"] = str(tmp_path)
    config["sample"]["sample_every"] = 0
    config["train"].update(train_changes)
    return config


def scores_of(result):
    with open(os.path.join(result.run_folder, FILE), encoding="utf-8") as f:
        return json.load(f)


def test_a_run_at_learning_rate_0_fails_the_thresholds(tmp_path):
    # 10 steps stand for the shipped count: at lr 0 every step leaves the LoRA at zero
    result = train(quickstart_config(tmp_path, lr=0.0, steps=10))
    scores = scores_of(result)
    assert not learned(scores), scores
    assert scores["lora"] == scores["base"]


def test_a_sign_flipped_target_fails_the_thresholds(tmp_path, monkeypatch):
    true_noisy_latents = flow.noisy_latents

    def flipped(latents, noise, sigmas):
        noisy, target = true_noisy_latents(latents, noise, sigmas)
        return noisy, -target

    monkeypatch.setattr(flow, "noisy_latents", flipped)
    # 40 of the shipped 2000 steps (150 before): the flipped target wrecks the LoRA from the first
    # steps on, and the verdict must not call a wrecked LoRA learned (a star detector that took
    # any large change for a star would). Measured at 40 steps: magenta 13% -> 0.4% of the sks
    # pictures' pixels flipped, 13% -> 5% with the true target (which draws no star yet, even at
    # 150 steps: "not learned" alone holds for a sound trainer too, so the LoRA must also be
    # wrecked, which fails if the flip stops reaching the loop).
    scores = scores_of(train(quickstart_config(tmp_path, steps=40)))
    assert not learned(scores), scores
    assert scores["lora"]["magenta"] < 0.25 * scores["base"]["magenta"], scores
