"""The demo, in one package: the magenta star "sks" the project draws itself (dataset.py), its
regularization shapes, the built-in names `builtin:demo` and `builtin:demo-shapes` (builtin.py),
and the score of a demo run in generated pixels (score.py on concept.py), which the demo dataset
brings to the trainer as a finish step. The shapes model it trains on stays a model
(core/families/flux/shapes)."""
from .builtin import BUILTIN_DATASETS, DatasetSource, resolve_dataset, resolve_dataset_folder

__all__ = ["BUILTIN_DATASETS", "DatasetSource", "resolve_dataset", "resolve_dataset_folder"]
