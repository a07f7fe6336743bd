"""Sample images and labelled grids (SampleGrid and the trainer's sample_every)."""
from .generate import encoded_now, grid_of, prompts_with_trigger, sample_images, save_samples
from .grid import make_grid
from .strength_grid import strength_grid

__all__ = ["encoded_now", "grid_of", "make_grid", "prompts_with_trigger", "sample_images", "save_samples",
           "strength_grid"]
