"""The plan of a run before it starts, as a report: what the dataset holds, the run plan's steps
and epochs (run_plan.py), what memory the rank and optimizer cost, and the guide's advice that
applies. `loralab plan` prints it; LoadDataset's STRING report is the same text."""
import collections
import os
from dataclasses import dataclass, field

from ..config import step_band
from ..dataset import bucket_size
from .advice import advise
from .run_plan import RunPlan, arithmetic, guide_steps, plan_run

# Bucket sides before the family is known (model.family auto): a multiple of every family's.
ANY_SIZE_MULTIPLE = 64


@dataclass
class DatasetPlan:
    run: RunPlan
    sizes: collections.Counter    # (width, height) -> image count, of the dataset's images
    buckets: dict                 # resolution -> Counter of (width, height) buckets
    memory: object = None         # MemoryEstimate, or None when it could not be estimated
    advice: list = field(default_factory=list)

    @property
    def warnings(self):
        return [a for a in self.advice if a.level == "warning"]

    @property
    def band(self):
        """The guide's (low, high) steps for the training images; high is None for 50+."""
        return step_band(len(self.run.training))


def plan_dataset(scan_or_folder, config=None):
    """DatasetPlan of a Scan (or a folder, scanned with the config's caption settings)."""
    from ..memory import estimate_memory

    scan = None if isinstance(scan_or_folder, str) else scan_or_folder
    if scan is None:
        config = {**(config or {}), "dataset": {**(config or {}).get("dataset", {}), "folder": scan_or_folder}}
    run = plan_run(config, scan)
    config, dataset = run.config, run.dataset
    multiple = _size_multiple(config["model"]["family"])
    buckets = {r: collections.Counter(bucket_size(i.width, i.height, r, multiple) for i in dataset.items)
               for r in config["dataset"]["resolution"]}
    try:
        memory = estimate_memory(config)
    except (OSError, ValueError, KeyError):  # an unreadable model folder must not stop the plan
        memory = None
    given = {**config, "train": {**config["train"], "steps": run.steps if run.steps_given else None}}
    return DatasetPlan(run, sizes=collections.Counter((i.width, i.height) for i in dataset.items),
                       buckets=buckets, memory=memory, advice=advise(dataset, given))  # steps: as given


def _size_multiple(family):
    """The family's bucket multiple (its SIZE_MULTIPLE); ANY_SIZE_MULTIPLE while it is auto."""
    from ..families import NAMES, get_family

    return get_family(family).SIZE_MULTIPLE if family in NAMES else ANY_SIZE_MULTIPLE


def _counts(counter):
    return ", ".join(f"{w}x{h} ({n})" for (w, h), n in counter.most_common())


def _names(items, indices):
    return ", ".join(os.path.basename(items[i].path) for i in indices)


def plan_report(scan_or_folder, config=None):
    """The plan as plain text: numbers first, then the advice that applies."""
    plan = scan_or_folder if isinstance(scan_or_folder, DatasetPlan) else plan_dataset(scan_or_folder, config)
    run, dataset = plan.run, plan.run.dataset
    numbers = run.numbers()
    lines = [f"dataset: {dataset.folder}",
             f"images: {len(dataset.items)} found, {len(dataset.skipped)} skipped"]
    lines += [f"  skipped {name}: {reason}" for name, reason in dataset.skipped]
    if run.held_out:
        lines.append(f"held out for the validation loss: {len(run.held_out)} "
                     f"({_names(run.scan.items, run.held_out)}); {numbers['images']} train")
    if run.regularization:
        lines.append(f"regularization images: {len(run.regularization)} "
                     f"({run.config['dataset']['regularization_folder']}), "
                     f"{numbers['regularization_ratio']:g} per training entry in each epoch")
    if dataset.missing_captions:
        missing = dataset.missing_captions
        lines.append(f"captions missing: {len(missing)} ({', '.join(missing[:10])}"
                     + (", ..." if len(missing) > 10 else "") + ")")
    else:
        lines.append("captions: every image has one")
    lines.append(f"image sizes: {_counts(plan.sizes)}")
    for resolution, buckets in plan.buckets.items():
        lines.append(f"buckets at {resolution}: {_counts(buckets)}")
    chosen = "given" if run.steps_given else "recommended for this dataset size"
    lines.append(f"steps: {run.steps} ({chosen}; {guide_steps(numbers)})")
    lines.append(arithmetic(numbers))
    if plan.memory is not None:
        lines.append(f"memory (estimate): {plan.memory.describe()}")
    if plan.advice:
        lines.append("advice:")
        lines += [f"  - {'warning' if a.level == 'warning' else 'note'}: {a.message}" for a in plan.advice]
    else:
        lines.append("advice: none, the settings follow the guide")
    return "\n".join(lines)
