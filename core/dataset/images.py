"""Reading a dataset image the one way that scan, plan, buckets and training all share: fully
decoded (a truncated or corrupt file fails here, not later) and turned the right way up by its
EXIF orientation, so the size measured at scan is the size that is cropped at training; and
turned into the 8-bit RGB it looks like."""
import numpy
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparency is composited on white, as viewers and browsers show it


def decode_upright(path):
    """The image of `path`, every pixel decoded and turned by its EXIF orientation. Raises what
    PIL raises for a file it cannot decode completely (PIL's LOAD_TRUNCATED_IMAGES stays off, so
    a half-written JPEG raises instead of coming back padded with grey)."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def rgb(image):
    """`image` as the 8-bit RGB it looks like. PIL's own convert("RGB") clips 16-bit greyscale
    (I;16, a PNG's 16-bit grey) to white, and drops transparency to whatever colour the
    transparent pixels hold (often black, or the palette's); here 16-bit values are scaled to
    8 bits and transparency is composited on white. CMYK and palettes convert as PIL does."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = numpy.asarray(image, dtype=numpy.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:  # 16-bit values
            values = values / 257
        elif image.mode == "F" and values.max(initial=0) <= 1:  # floats in 0..1
            values = values * 255
        image = Image.fromarray(numpy.clip(values.round(), 0, 255).astype(numpy.uint8), "L")
    if image.has_transparency_data:
        layer = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", layer.size, BACKGROUND + (255,)), layer).convert("RGB")
    return image.convert("RGB")
