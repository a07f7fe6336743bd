"""How well an image shows a prompted scene, measured from its pixels: is the border the
background colour, is the rest mostly the shape's colour, and is that patch the shape's form."""
import numpy

from .scenes import PALETTE

BORDER = 4  # pixels of frame that must be background (scenes keep a 10% margin)
FILL = {"circle": numpy.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding box


def nearest_colour(rgb):
    return min(PALETTE, key=lambda name: numpy.linalg.norm(numpy.asarray(PALETTE[name]) - rgb))


def scene_score(image, colour, shape, background):
    """{"background", "colour", "shape": bool, "fill": float} for one PIL image. Foreground is
    every pixel nearer the prompted colour than the prompted background."""
    pixels = numpy.asarray(image.convert("RGB"), dtype=numpy.float32)
    frame = numpy.ones(pixels.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border_ok = nearest_colour(numpy.median(pixels[frame], axis=0)) == background
    to_colour = numpy.linalg.norm(pixels - numpy.asarray(PALETTE[colour]), axis=-1)
    to_background = numpy.linalg.norm(pixels - numpy.asarray(PALETTE[background]), axis=-1)
    foreground = to_colour < to_background
    foreground[frame] = False
    result = {"background": bool(border_ok), "colour": False, "shape": False, "fill": 0.0}
    if foreground.sum() < 0.03 * foreground.size:  # no patch of the colour worth the name
        return result
    # the patch's own colour (not only "nearer than the background") must be the prompted one
    result["colour"] = nearest_colour(numpy.median(pixels[foreground], axis=0)) == colour
    rows, columns = numpy.nonzero(foreground)
    box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    result["fill"] = float(foreground.sum() / box)
    result["shape"] = min(FILL, key=lambda name: abs(FILL[name] - result["fill"])) == shape
    return result
