"""Measurements of images that the coach compares: how different two images are, how sharp an
image is, and a small perceptual hash for finding near-duplicates in a dataset.

Differences are mean absolute differences on the 0..255 scale, so "3" means the two images
differ by about 3 grey levels per channel on average."""
import numpy
from PIL import Image, ImageOps

COMPARE_SIZE = 128      # images are compared at this size: enough to see content, cheap to do
SHARPNESS_SIZE = 512    # blur shows in fine detail, so sharpness is measured at a larger size


def pixels(image, size=None):
    """float32 RGB array of `image`, optionally fitted (resized and centre-cropped) to `size`."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = ImageOps.fit(image, tuple(size), method=Image.Resampling.BILINEAR)
    return numpy.asarray(image, dtype=numpy.float32)


def comparable(image, size=COMPARE_SIZE):
    """The array used for every difference: the image fitted to size x size."""
    return pixels(image, (size, size))


def difference(a, b):
    """Mean absolute difference of two images (PIL or arrays from `comparable`), 0..255."""
    a = a if isinstance(a, numpy.ndarray) else comparable(a)
    b = b if isinstance(b, numpy.ndarray) else comparable(b)
    return float(numpy.abs(a - b).mean())


def sharpness(image):
    """Variance of the Laplacian of the grey image: falls when an image blurs, rises with noise."""
    grey = image.convert("L")
    if max(grey.size) > SHARPNESS_SIZE:
        grey.thumbnail((SHARPNESS_SIZE, SHARPNESS_SIZE), Image.Resampling.BILINEAR)
    g = numpy.asarray(grey, dtype=numpy.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    laplacian = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(laplacian.var())


def difference_hash(image, size=8):
    """64-bit dHash: for a size x (size+1) grey thumbnail, whether each pixel is brighter than its
    right neighbour. Resizing, recompression and small edits change few bits. Hand-written: four
    lines of Pillow and numpy, where the imagehash package would be one more dependency."""
    grey = image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR)
    g = numpy.asarray(grey, dtype=numpy.int16)
    return numpy.packbits((g[:, 1:] > g[:, :-1]).ravel())


def grey_thumbnail(image, size=16):
    """size x size grey array in 0..255: brightness and colour layout, none of the detail."""
    return numpy.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR),
                         dtype=numpy.float32)


def hash_distance(a, b):
    """Number of differing bits between two difference hashes."""
    return int(numpy.unpackbits(numpy.bitwise_xor(a, b)).sum())
