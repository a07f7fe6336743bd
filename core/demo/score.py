"""Did the demo concept get learned, and did it bleed? Measured in generated pixels when a run
trains on the built-in demo dataset (the magenta star "sks", dataset.py): the base
model (strength 0) and the LoRA (strength 1) draw the same prompts from the same seeds, and

- concept: the share of "sks" pictures showing a magenta five-pointed star (concept.py), and
  their share of magenta pixels;
- bleed: the share of "a red circle on a white background" pictures that stay red on white with
  no magenta star ("red"), and of those whose patch also fills its bounding box as a circle does,
  not as a square, a triangle or a star ("red_circle"). The base model passes both 8 times in 8.

The demo dataset's finish step writes them to the run folder's demo_scores.json; the run summary
prints it."""
import json
import os

from ..families.flux.shapes.scenes import caption
from ..families.flux.shapes.score import scene_score
from ..runs import write_json
from ..sampling.strength_grid import strength_grid
from .concept import blob_of
from .dataset import BLEED_SCENE

CONCEPT_PROMPTS = ("a photo of [trigger]", "[trigger] on a blue background")
BLEED_PROMPT = caption(*BLEED_SCENE)  # "a red circle on a white background"
# 8 seeds: 48 pictures (3 prompts x base and LoRA), the demo's measured verdict. Tests that run the
# demo for its plumbing, not its verdict, draw fewer (tests/conftest.py sets LORALAB_DEMO_SEEDS).
SEEDS = tuple(range(int(os.environ.get("LORALAB_DEMO_SEEDS") or 8)))
FILE = "demo_scores.json"


def bleed_of(image):
    """(stays red on white with no magenta star, and also round)"""
    score = scene_score(image, *BLEED_SCENE)
    red = score["colour"] and score["background"] and not blob_of(image, "magenta").is_star
    return red, red and score["shape"]


def scores_of(images_per_seed, concept_count):
    """{"star", "magenta", "red", "red_circle"} over seeds, from each seed's images per prompt
    (the concept prompts first, then the bleed prompt)."""
    concept = [image for images in images_per_seed for image in images[:concept_count]]
    bleed = [bleed_of(images[concept_count]) for images in images_per_seed]
    blobs = [blob_of(image, "magenta") for image in concept]
    return {"star": sum(b.is_star for b in blobs) / len(blobs),
            "magenta": sum(b.share for b in blobs) / len(blobs),
            "red": sum(red for red, _ in bleed) / len(bleed),
            "red_circle": sum(round_too for _, round_too in bleed) / len(bleed)}


def demo_scores(family, pipeline, lora, trigger_word, sample_config, device, seeds=SEEDS):
    """{"base": scores, "lora": scores, "seeds", "prompts"}. lora: {"weights", "network"} as
    SampleGrid takes it. The pipeline is left with no LoRA on it (strength_grid's contract)."""
    prompts = [*CONCEPT_PROMPTS, BLEED_PROMPT]
    per_seed = {0.0: [], 1.0: []}
    for seed in seeds:
        _, images = strength_grid(family, pipeline, prompts, [0.0, 1.0], {**sample_config, "seed": seed},
                                  device, lora=lora, trigger_word=trigger_word)
        for strength in per_seed:
            per_seed[strength].append(images[strength])
    return {"base": scores_of(per_seed[0.0], len(CONCEPT_PROMPTS)),
            "lora": scores_of(per_seed[1.0], len(CONCEPT_PROMPTS)),
            "seeds": list(seeds), "prompts": prompts, "sample_steps": sample_config["sample_steps"]}


def write_scores(run, family, pipeline, weights, config, device):
    """The demo's verdict in pixels, for the run summary (the finish step builtin.py names),
    drawn at the size the run trained at (its first resolution), whatever size its samples are."""
    lora = {"weights": weights, "network": config["network"]}
    side = config["dataset"]["resolution"][0]
    write_json(run.file(FILE), demo_scores(family, pipeline, lora, config["dataset"]["trigger_word"],
                                           {**config["sample"], "width": side, "height": side}, device))


def summary_lines(run_folder):
    """The run summary's lines for demo_scores.json, or none when the run has no such file."""
    try:
        with open(os.path.join(run_folder, FILE), encoding="utf-8") as f:
            scores = json.load(f)
        base, lora = scores["base"], scores["lora"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    count = len(scores["seeds"])
    return [f"demo concept (a magenta star where 'sks' is prompted, {count} seeds): "
            f"base {base['star']:.0%}, LoRA {lora['star']:.0%} of pictures; magenta pixels "
            f"{base['magenta']:.0%} -> {lora['magenta']:.0%}",
            f"demo bleed ('{BLEED_PROMPT}'): still red on white: base {base['red']:.0%}, LoRA "
            f"{lora['red']:.0%}; still round too: base {base['red_circle']:.0%}, LoRA {lora['red_circle']:.0%}"]
