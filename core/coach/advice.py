"""The guide's advice (docs/training-guide.md, sections 1-3) as rules over a dataset scan and a config. Each
rule returns the Advice that applies, or nothing; the message says what was seen, why it matters
and what to do."""
import math
from dataclasses import dataclass

from ..config import step_band
from ..config.guide import (GOOD_IMAGES, LR, LR_BAND, LR_RANGE, MIN_IMAGES, RANK_BAND, RANK_RECOMMENDED,
                            RESOLUTION_BAND, band, exponent)

SIZE_SPREAD_LIMIT = 1.5   # largest / smallest image side (square root of the area) still "consistent"


@dataclass
class Advice:
    rule: str           # stable name of the rule, e.g. "few_images"
    message: str
    level: str = "warning"   # "warning": the guide advises against it; "note": worth knowing


def step_band_text(count):
    """The guide's step band for `count` images as text: "low-high", or "low+" past the table."""
    low, high = step_band(count)
    return f"{low}-{high}" if high else f"{low}+"


def _names(names, most=5):
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def few_images(scan, config):
    count = len(scan.items)
    if count < MIN_IMAGES:
        return Advice("few_images", f"only {count} image(s): the guide asks for at least "
                      f"{MIN_IMAGES}-{GOOD_IMAGES} for good results. Add images with a variety of "
                      "angles, lighting and backgrounds.")
    if count < GOOD_IMAGES:
        return Advice("few_images", f"{count} images: enough to start; {GOOD_IMAGES} or more "
                      "with varied angles, lighting and backgrounds give better results.", "note")


def missing_captions(scan, config):
    missing = scan.missing_captions
    if missing:
        ext = config["dataset"]["caption_ext"]
        return Advice("missing_captions", f"{len(missing)} image(s) have no .{ext} caption: "
                      f"{_names(missing)}. They train on the trigger word alone; write a caption "
                      "that describes what is not the subject (background, pose, lighting).", "note")


def skipped_images(scan, config):
    if scan.skipped:
        return Advice("skipped_images", f"{len(scan.skipped)} file(s) skipped: " + "; ".join(
            f"{name}: {reason}" for name, reason in scan.skipped[:5]) + ". Replace or remove them.")


def caption_files(scan, config):
    if scan.notes:
        return Advice("caption_files", f"{len(scan.notes)} caption file(s) read with a change: " + "; ".join(
            f"{name}: {note}" for name, note in scan.notes[:5]) + ".")


def _side(item):
    return math.sqrt(item.width * item.height)


def inconsistent_resolutions(scan, config):
    sides = sorted(scan.items, key=_side)
    smallest, largest = sides[0], sides[-1]
    if _side(largest) / _side(smallest) > SIZE_SPREAD_LIMIT:
        return Advice("inconsistent_resolutions", f"image sizes vary a lot, from "
                      f"{smallest.width}x{smallest.height} to {largest.width}x{largest.height}. The "
                      "guide asks for a consistent resolution: small images train at smaller "
                      "buckets and look softer. Resize or replace the outliers.")


def below_resolution(scan, config):
    resolution = max(config["dataset"]["resolution"])
    small = [item for item in scan.items if item.width * item.height < resolution * resolution]
    if small:
        import os

        names = [f"{os.path.basename(i.path)} ({i.width}x{i.height})" for i in small]
        return Advice("below_resolution", f"{len(small)} image(s) are smaller than the training "
                      f"resolution {resolution}: {_names(names)}. They are not upscaled, so they "
                      f"train at a smaller bucket. Use larger originals, or train at a resolution "
                      "they reach.")


def resolution_band(scan, config):
    outside = [r for r in config["dataset"]["resolution"]
               if not RESOLUTION_BAND[0] <= r <= RESOLUTION_BAND[1]]
    if outside:
        return Advice("resolution_band", f"training resolution(s) {outside} are outside the guide's "
                      f"{band(RESOLUTION_BAND)}; choose them from the size of "
                      "your originals.", "note")


def near_duplicate_images(scan, config):
    from .duplicates import near_duplicates

    pairs = near_duplicates([item.path for item in scan.items])
    if pairs:
        return Advice("near_duplicates", f"{len(pairs)} pair(s) of near-duplicate images: "
                      f"{_names([f'{a} ~ {b}' for a, b in pairs])}. Duplicates weigh one view "
                      "more than the rest and push the LoRA to copy it; keep one of each pair.")


def lr_band(scan, config):
    lr, optimizer = config["train"]["lr"], config["train"]["optimizer"]
    if optimizer == "prodigy":  # prodigy finds its own step size; lr multiplies it
        if not 0.1 <= lr <= 10:
            return Advice("lr_band", f"train.lr = {lr:g} with prodigy: prodigy sets its own step "
                          "size and lr only scales it; use 1.0.")
        return None
    if lr == 0:
        return Advice("lr_band", "train.lr is 0: the LoRA will not learn anything. The guide's "
                      f"default is {exponent(LR)}.")
    if not LR_BAND[0] <= lr <= LR_BAND[1]:
        side = ("low: training is slow and may not learn in the planned steps" if lr < LR_BAND[0]
                else "high: faster but risky (loss jumps, NaN, overfitting); watch the samples")
        return Advice("lr_band", f"train.lr = {lr:g} is outside the guide's optimal range "
                      f"{LR_RANGE}, too {side}. Start from {exponent(LR)}.")


def rank_band(scan, config):
    if config["network"].get("type", "lora") != "lora":  # the guide's bands are LoRA ranks; a LoKr
        return None                                      # or LoHa of the same rank holds another size
    rank = config["network"]["linear"]
    if not RANK_BAND[0] <= rank <= RANK_BAND[1]:
        side = ("low: it saves memory but learns little detail" if rank < RANK_BAND[0]
                else "high: it costs memory (see the estimate) and can learn noise; 64+ only "
                "pays off on large models with memory to spare")
        return Advice("rank_band", f"network.linear (rank) = {rank} is outside the guide's "
                      f"{band(RANK_BAND)}, too {side}. {band(RANK_RECOMMENDED)} suits most cases.")
    if rank < RANK_RECOMMENDED[0]:
        return Advice("rank_band", f"network.linear (rank) = {rank}: fine when memory is short; "
                      f"{band(RANK_RECOMMENDED)} (the guide's recommendation) learns more detail.", "note")


def _above_one(rule, setting, value, why):
    if value > 1:
        return Advice(rule, f"{setting} = {value}: {why}")


def batch_size_above_one(scan, config):
    return _above_one("batch_size", "train.batch_size", config["train"]["batch_size"],
                      "the guide recommends 1, unequivocally. Larger batches train less stably, "
                      "miss fine detail and take more memory for no real gain.")


def repeats_above_one(scan, config):
    return _above_one("repeats", "dataset.repeats", config["dataset"]["repeats"],
                      "the guide recommends 1 in most cases; it only changes how steps are "
                      "counted into epochs. Keep 1 and set the number of steps instead.")


def steps_band(scan, config):
    steps = config["train"]["steps"]
    if steps is None:
        return None
    count = len(scan.items)
    low, high = step_band(count)
    if steps < low or (high is not None and steps > high):
        side = "too few to learn the subject" if steps < low else "more than needed: overfitting risk"
        return Advice("steps_band", f"train.steps = {steps} is outside the guide's "
                      f"{step_band_text(count)} for {count} images ({side}). Leave steps empty "
                      "to use the recommended number.")


def model_traps(scan, config):
    """The family's warnings about the model itself (e.g. training a distilled model)."""
    from ..families import NAMES, get_family

    family = config["model"].get("family")
    messages = get_family(family).advice(config["model"]) if family in NAMES else []
    if messages:
        return Advice("model", " ".join(messages))


RULES = (skipped_images, caption_files, few_images, missing_captions, inconsistent_resolutions, below_resolution,
         resolution_band, near_duplicate_images, lr_band, rank_band, batch_size_above_one,
         repeats_above_one, steps_band, model_traps)


def advise(scan, config):
    """Every Advice that applies to this scan and (defaults-filled) config, in the rules' order."""
    return [advice for rule in RULES if (advice := rule(scan, config)) is not None]
