"""The guide's formulas (sections 1 and 4): steps per epoch, epochs, and recommended steps."""
import math


def steps_per_epoch(num_images, repeats=1, batch_size=1):
    """(number_of_images x repeats) / batch_size, rounded up: a last partial batch is a step."""
    return max(1, math.ceil(num_images * repeats / batch_size))


def epochs(total_steps, num_images, repeats=1, batch_size=1):
    return total_steps / steps_per_epoch(num_images, repeats, batch_size)


# The guide's table: up to 20 images 1000-1500 steps; 20-50 images 1500-2500; 50+ 2500+.
STEP_BANDS = ((20, 1000, 1500), (50, 1500, 2500))


def step_band(num_images):
    """(low, high) steps the guide recommends for this many images; high is None for 50+."""
    for max_images, low, high in STEP_BANDS:
        if num_images <= max_images:
            return low, high
    return 2500, None


def recommended_steps(num_images):
    """A point inside the guide's band, rising with the dataset: 10 images -> 1250, 20 -> 1500,
    35 -> 2000, 50 -> 2500, then 20 more steps per image above 50 (capped at 6000)."""
    if num_images <= 20:
        return round(1000 + 500 * max(num_images, 0) / 20)
    if num_images <= 50:
        return round(1500 + 1000 * (num_images - 20) / 30)
    return min(6000, 2500 + 20 * (num_images - 50))
