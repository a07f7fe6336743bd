"""Which images of a scanned dataset are held out of training to measure a validation loss
(dataset.validation_images)."""
from .scan import DatasetError


def hold_out(scan, count):
    """(training indices, held-out indices) into scan.items. The held-out images are spread
    evenly over the folder's sorted names: the same images for every seed and every run of the
    folder, so validation losses of different runs compare, and a folder sorted by shoot or
    pose gives up one image from each part. Raises DatasetError when no training image is left."""
    total = len(scan.items)
    if count and count >= total:
        raise DatasetError(
            f"dataset.validation_images = {count} holds out every image: {scan.folder} has "
            f"{total} usable image(s), and at least 1 must be left to train on. Set "
            f"dataset.validation_images to at most {total - 1} (0 turns the validation loss off), "
            "or add images to the folder.")
    held_out = [int((number + 0.5) * total / count) for number in range(count)]
    return [index for index in range(total) if index not in held_out], held_out
