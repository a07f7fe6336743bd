"""Near-duplicate images in a dataset: the same picture resized, recompressed or barely edited.
Duplicates weigh one view more than the others and push the LoRA toward copying it."""
import itertools
import os

from PIL import Image, ImageOps

from ..dataset.images import rgb
from .images import difference_hash, grey_thumbnail, hash_distance

# Two images are near-duplicates when both their structure (dHash, of 64 bits) and their
# brightness layout (16x16 grey thumbnails, 0..255) agree. The hash alone matches flat images of
# different colours; the thumbnail alone matches different pictures of similar tones.
HASH_BITS_LIMIT = 8
GREY_DIFFERENCE_LIMIT = 10.0


def _signature(path):
    with Image.open(path) as image:
        image.draft("RGB", (64, 64))  # JPEG decodes at a reduced size: fast on big photos
        image = rgb(ImageOps.exif_transpose(image))  # as trained: 16-bit, transparency
        return difference_hash(image), grey_thumbnail(image)


def near_duplicates(paths):
    """[(name_a, name_b)] for each pair of near-duplicate images among `paths`."""
    signatures = [(path, *_signature(path)) for path in paths]
    pairs = []
    for (path_a, hash_a, grey_a), (path_b, hash_b, grey_b) in itertools.combinations(signatures, 2):
        if (hash_distance(hash_a, hash_b) <= HASH_BITS_LIMIT
                and abs(grey_a - grey_b).mean() <= GREY_DIFFERENCE_LIMIT):
            pairs.append((os.path.basename(path_a), os.path.basename(path_b)))
    return pairs
