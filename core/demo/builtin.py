"""The built-in dataset names, drawn locally on first use so the quickstart runs on a fresh machine
with no download. A dataset folder resolves to a DatasetSource: where its pictures are, and the
finish steps it brings (the demo's score), which the trainer runs after the final LoRA is written."""
import os
from dataclasses import dataclass

from ..families.builtin import build_once, cache_root


@dataclass(frozen=True)
class DatasetSource:
    folder: str          # a folder of pictures on disk
    finish: tuple = ()   # f(run, family, pipeline, weights, config, device) after the final LoRA


def score_demo(run, family, pipeline, weights, config, device):
    """The demo's finish step: its verdict in pixels, written for the run summary."""
    from .score import write_scores  # sampling loads peft: only when a demo run ends

    write_scores(run, family, pipeline, weights, config, device)


# name: (folder in the cache, image count, the function in dataset.py that draws it, finish
# steps); a new drawing gets a new folder, never an old one's
BUILTIN_DATASETS = {"builtin:demo": ("demo-star", 8, "make_demo_dataset", (score_demo,)),
                    "builtin:demo-shapes": ("demo-shapes", 16, "make_shapes_dataset", ())}


def resolve_dataset(folder):
    """The DatasetSource of a `dataset.folder` setting: a path as given (no finish steps), or a
    built-in dataset, drawn on first use."""
    if folder not in BUILTIN_DATASETS:
        return DatasetSource(folder)
    from . import dataset  # PIL drawing: only when a built-in name is used

    name, count, draw, finish = BUILTIN_DATASETS[folder]
    path = build_once(os.path.join(cache_root(), "datasets", name), "image_000.txt",
                      lambda target: getattr(dataset, draw)(target, count=count))
    return DatasetSource(path, finish)


def resolve_dataset_folder(folder):
    return resolve_dataset(folder).folder
