"""The guide's formulas (sections 1 and 4): steps per epoch, epochs, and recommended steps."""
import math

from .guide import MAX_RECOMMENDED_STEPS, STEP_BANDS, STEPS_PER_IMAGE_ABOVE


def steps_per_epoch(num_images, repeats=1, batch_size=1):
    """(number_of_images x repeats) / batch_size, rounded up: a last partial batch is a step."""
    return max(1, math.ceil(num_images * repeats / batch_size))


def epochs(total_steps, num_images, repeats=1, batch_size=1):
    return total_steps / steps_per_epoch(num_images, repeats, batch_size)



def step_band(num_images):
    """(low, high) steps the guide recommends for this many images; high is None for 50+."""
    for max_images, low, high in STEP_BANDS:
        if num_images <= max_images:
            return low, high
    return STEP_BANDS[-1][2], None


def recommended_steps(num_images):
    """A point inside the guide's band, rising with the dataset: 10 images -> 1250, 20 -> 1500,
    35 -> 2000, 50 -> 2500, then 20 more steps per image above 50 (capped at 6000)."""
    below = 0
    for max_images, low, high in STEP_BANDS:
        if num_images <= max_images:
            return round(low + (high - low) * max(num_images - below, 0) / (max_images - below))
        below = max_images
    return min(MAX_RECOMMENDED_STEPS, STEP_BANDS[-1][2] + STEPS_PER_IMAGE_ABOVE * (num_images - below))
