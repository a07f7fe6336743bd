"""The plan of a run before it starts: what the dataset holds, how steps divide into epochs by the
guide's formulas, what memory the rank and optimizer cost, and the guide's advice that applies.
`loralab plan` prints it; LoadDataset's STRING report is the same text."""
import collections
import copy
from dataclasses import dataclass, field

from ..config import defaults, epochs, recommended_steps, step_band, steps_per_epoch
from ..dataset import bucket_size, scan_folder
from .advice import advise, step_band_text

# Bucket sides before the family is known (model.family auto): a multiple of every family's.
ANY_SIZE_MULTIPLE = 64


def with_defaults(config):
    """A copy of a (possibly partial, unvalidated) config with every missing setting defaulted,
    so the plan works from a dataset node that knows only the dataset settings."""
    def fill(base, extra):
        merged = copy.deepcopy(base)
        for key, value in (extra or {}).items():
            merged[key] = fill(merged.get(key, {}), value) if isinstance(value, dict) else value
        return merged

    filled = fill(defaults(), config)
    if filled["network"].get("linear_alpha") is None:
        filled["network"]["linear_alpha"] = filled["network"]["linear"]
    return filled


@dataclass
class DatasetPlan:
    folder: str
    images: int
    skipped: list                 # (file name, reason)
    missing_captions: list        # file names
    sizes: collections.Counter    # (width, height) -> image count
    buckets: dict                 # resolution -> Counter of (width, height) buckets
    steps: int
    steps_given: bool             # False: chosen from the dataset size by the guide's table
    band: tuple                   # the guide's (low, high) steps for this many images
    repeats: int
    batch_size: int
    steps_per_epoch: int
    epochs: float
    memory: object = None         # MemoryEstimate, or None when it could not be estimated
    advice: list = field(default_factory=list)

    @property
    def warnings(self):
        return [a for a in self.advice if a.level == "warning"]


def plan_dataset(scan_or_folder, config=None):
    """DatasetPlan of a Scan (or a folder, scanned with the config's caption settings)."""
    from ..families.builtin import resolve_dataset_folder
    from ..memory import estimate_memory

    config = with_defaults(config)
    data, train = config["dataset"], config["train"]
    scan = scan_or_folder
    if isinstance(scan_or_folder, str):
        scan = scan_folder(resolve_dataset_folder(scan_or_folder), data["caption_ext"], data["trigger_word"])
    count, repeats, batch = len(scan.items), data["repeats"], train["batch_size"]
    steps = train["steps"] or recommended_steps(count)
    multiple = _size_multiple(config["model"]["family"])
    buckets = {r: collections.Counter(bucket_size(i.width, i.height, r, multiple) for i in scan.items)
               for r in data["resolution"]}
    try:
        memory = estimate_memory(config)
    except (OSError, ValueError, KeyError):  # an unreadable model folder must not stop the plan
        memory = None
    return DatasetPlan(
        folder=scan.folder, images=count, skipped=list(scan.skipped),
        missing_captions=scan.missing_captions,
        sizes=collections.Counter((i.width, i.height) for i in scan.items), buckets=buckets,
        steps=steps, steps_given=train["steps"] is not None, band=step_band(count),
        repeats=repeats, batch_size=batch, steps_per_epoch=steps_per_epoch(count, repeats, batch),
        epochs=epochs(steps, count, repeats, batch), memory=memory, advice=advise(scan, config))


def _size_multiple(family):
    """The family's bucket multiple (its SIZE_MULTIPLE); ANY_SIZE_MULTIPLE while it is auto."""
    from ..families import NAMES, get_family

    return get_family(family).SIZE_MULTIPLE if family in NAMES else ANY_SIZE_MULTIPLE


def _counts(counter):
    return ", ".join(f"{w}x{h} ({n})" for (w, h), n in counter.most_common())


def plan_report(scan_or_folder, config=None):
    """The plan as plain text: numbers first, then the advice that applies."""
    plan = scan_or_folder if isinstance(scan_or_folder, DatasetPlan) else plan_dataset(scan_or_folder, config)
    lines = [f"dataset: {plan.folder}",
             f"images: {plan.images} found, {len(plan.skipped)} skipped"]
    lines += [f"  skipped {name}: {reason}" for name, reason in plan.skipped]
    if plan.missing_captions:
        missing = plan.missing_captions
        lines.append(f"captions missing: {len(missing)} ({', '.join(missing[:10])}"
                     + (", ..." if len(missing) > 10 else "") + ")")
    else:
        lines.append("captions: every image has one")
    lines.append(f"image sizes: {_counts(plan.sizes)}")
    for resolution, buckets in plan.buckets.items():
        lines.append(f"buckets at {resolution}: {_counts(buckets)}")
    chosen = "given" if plan.steps_given else "recommended for this dataset size"
    lines.append(f"steps: {plan.steps} ({chosen}; the guide's band for {plan.images} images "
                 f"is {step_band_text(plan.images)})")
    lines.append(f"steps per epoch = {plan.images} images x {plan.repeats} repeats / batch "
                 f"{plan.batch_size} = {plan.steps_per_epoch}; epochs = {plan.steps} / "
                 f"{plan.steps_per_epoch} = {plan.epochs:.4g}")
    if plan.memory is not None:
        lines.append(f"memory (estimate): {plan.memory.describe()}")
    if plan.advice:
        lines.append("advice:")
        lines += [f"  - {'warning' if a.level == 'warning' else 'note'}: {a.message}" for a in plan.advice]
    else:
        lines.append("advice: none, the settings follow the guide")
    return "\n".join(lines)
