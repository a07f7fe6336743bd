"""Reading a dataset image the one way that scan, plan, buckets and training all share: fully
decoded (a truncated or corrupt file fails here, not later) and turned the right way up by its
EXIF orientation, so the size measured at scan is the size that is cropped at training."""
from PIL import Image, ImageOps


def decode_upright(path):
    """The image of `path`, every pixel decoded and turned by its EXIF orientation. Raises what
    PIL raises for a file it cannot decode completely (PIL's LOAD_TRUNCATED_IMAGES stays off, so
    a half-written JPEG raises instead of coming back padded with grey)."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)
