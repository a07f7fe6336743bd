"""Aspect-ratio buckets: each image trains at a size whose area is about resolution^2, whose
sides are multiples of what the model needs, and whose shape is close to the image's own."""
import math

from PIL import Image, ImageOps

from .images import decode_upright, rgb
from .scan import DatasetError


def bucket_size(width, height, resolution, multiple):
    """(bucket_width, bucket_height) for an image at one training resolution. Images smaller than
    the resolution are not upscaled: they get the largest bucket that fits inside them."""
    aspect = width / height
    target_width = math.sqrt(resolution * resolution * aspect)
    target_height = target_width / aspect
    scale = min(1.0, width / target_width, height / target_height)
    bucket_width = max(multiple, int(target_width * scale) // multiple * multiple)
    bucket_height = max(multiple, int(target_height * scale) // multiple * multiple)
    return bucket_width, bucket_height


def load_for_bucket(path, size):
    """The image, the right way up, resized to cover `size` and centre-cropped to it, as RGB.
    A file that no longer decodes (changed or damaged since the scan) raises DatasetError."""
    try:
        image = rgb(decode_upright(path))
    except Exception as error:  # PIL raises many types for bad files
        raise DatasetError(
            f"dataset image {path} cannot be loaded ({type(error).__name__}: {error}). It may be "
            "damaged or was changed since the dataset was scanned: re-save or replace it, or "
            "remove it from the dataset folder, then start training again.") from error
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def crop_top_left(width, height, size):
    """(top, left) of the centre crop that load_for_bucket takes, in the resized image's pixels:
    what SDXL's micro-conditioning calls crop_coords_top_left. PIL's ImageOps.fit crops the
    source to the bucket's aspect ratio, centred, then resizes; this is that crop, scaled."""
    bucket_width, bucket_height = size
    if width / height >= bucket_width / bucket_height:  # wider than the bucket: sides are cut
        crop_width = bucket_width / bucket_height * height
        return 0, round((width - crop_width) / 2 * bucket_width / crop_width)
    crop_height = width / (bucket_width / bucket_height)
    return round((height - crop_height) / 2 * bucket_height / crop_height), 0
