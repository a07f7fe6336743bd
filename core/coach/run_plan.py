"""The plan of a run, computed once from its config and its dataset: which images train, which
are held out, the regularization images, the steps and how they divide into epochs. `loralab
plan` and LoadDataset's report show it, the trainer runs it (its "plan" event), and the run
folder's config.json keeps its numbers, which the run summary prints."""
import dataclasses
from dataclasses import dataclass

from ..config import epochs, recommended_steps, steps_per_epoch, with_defaults
from ..dataset import BatchPlan, Scan, add_regularization, hold_out, regularization_entries, scan_folder
from ..demo import resolve_dataset
from .advice import step_band_text


@dataclass
class RunPlan:
    config: dict          # every setting defaulted (alpha = rank, ...), train.steps chosen
    dataset: Scan         # the dataset folder's scan, as read
    scan: Scan            # the dataset's images, then the regularization images
    training: list        # indices into scan.items
    held_out: list        # dataset.validation_images: measured, never trained on
    regularization: list  # indices into scan.items
    steps_given: bool     # False: chosen by the guide's table for the training images
    finish: tuple = ()    # the dataset's finish steps (core/demo: the demo's score)

    @property
    def steps(self):
        return self.config["train"]["steps"]

    @property
    def ratio(self):
        """Regularization entries per training entry in each epoch (0: none)."""
        return self.config["dataset"]["regularization_ratio"] if self.regularization else 0

    def batches(self, sizes):
        """The trainer's BatchPlan of this plan, from each image's bucket sizes."""
        data, train = self.config["dataset"], self.config["train"]
        return BatchPlan({i: sizes[i] for i in self.training}, data["repeats"], train["batch_size"],
                         train["seed"], regularization={i: sizes[i] for i in self.regularization},
                         ratio=self.ratio)

    def numbers(self):
        """The plan's numbers, as the trainer's "plan" event and config.json carry them."""
        images, repeats = len(self.training), self.config["dataset"]["repeats"]
        entries = images * repeats
        entries += regularization_entries(entries, self.ratio)  # as the trainer's BatchPlan makes them
        batch = self.config["train"]["batch_size"]
        return {"images": images, "validation_images": len(self.held_out),
                "regularization_images": len(self.regularization), "regularization_ratio": self.ratio,
                "repeats": repeats, "batch_size": batch, "entries_per_epoch": entries,
                "steps": self.steps, "steps_per_epoch": steps_per_epoch(entries, 1, batch),
                "epochs": epochs(self.steps, entries, 1, batch)}


def plan_run(config, scan=None):
    """The RunPlan of a (possibly partial) config; `scan` is the dataset folder's Scan when the
    caller has read it already."""
    config = with_defaults(config)
    data, train = config["dataset"], config["train"]
    source = resolve_dataset(data.get("folder"))
    dataset = scan if scan is not None else scan_folder(source.folder, data["caption_ext"],
                                                        data["trigger_word"])
    training, held_out = hold_out(dataset, data["validation_images"])
    scan = dataclasses.replace(dataset, items=list(dataset.items), skipped=list(dataset.skipped))
    regularization = []
    if data["regularization_folder"]:  # their captions are as written: no trigger word
        regularization = add_regularization(scan, scan_folder(
            resolve_dataset(data["regularization_folder"]).folder, data["caption_ext"], "",
            key="dataset.regularization_folder"))
    plan = RunPlan(config, dataset, scan, training, held_out, regularization,
                   steps_given=train["steps"] is not None, finish=source.finish)
    # regularization images add dataset.regularization_ratio entries per training entry to each
    # epoch, so the guide's steps for the training images grow by as much
    train["steps"] = train["steps"] or round(recommended_steps(len(training)) * (1 + plan.ratio))
    return plan


def arithmetic(numbers):
    """How the steps divide into epochs, by the guide's formulas, from RunPlan.numbers()."""
    images, repeats, others = numbers["images"], numbers["repeats"], numbers["regularization_images"]
    entries = f"{images} images x {repeats} repeats"
    if others:
        extra = numbers["entries_per_epoch"] - images * repeats
        entries = f"({entries} + {extra} of the {others} regularization images)"
    return (f"steps per epoch = {entries} / batch {numbers['batch_size']} = {numbers['steps_per_epoch']}; "
            f"epochs = {numbers['steps']} / {numbers['steps_per_epoch']} = {numbers['epochs']:.4g}")


def guide_steps(numbers):
    """The guide's band of steps for these training images, and what regularization adds."""
    images, ratio = numbers["images"], numbers["regularization_ratio"]
    return (f"the guide's band for {images} images is {step_band_text(images)}"
            + (f", times {1 + ratio:g} with the regularization images" if ratio else ""))
