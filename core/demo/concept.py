"""Is the concept in the picture? A score from generated pixels alone, for the demo concept (a
magenta five-pointed star) and its bleed (does "a red circle" stay a red circle):

- the share of pixels of a colour (hue, saturation and value ranges, so shading still counts);
- the shape of that colour's largest blob: its solidity (area / convex hull area: a five-pointed
  star fills about half its hull, a circle, square or triangle nearly all of it) and how many
  points stick out of it (peaks of its outline's distance from the centre, by angle).

Hand-written on numpy: images are small (64-256 px) and our dependencies have no scipy/skimage."""
import math
from dataclasses import dataclass

import numpy

# hue in degrees (centre, half width); saturation and value minimums
COLOURS = {"magenta": (300, 30), "red": (0, 20), "green": (120, 35), "blue": (225, 30),
           "yellow": (55, 15)}


@dataclass(frozen=True)
class Blob:
    share: float       # of the image's pixels that have the colour
    area: int          # pixels in the largest connected blob of it
    solidity: float    # blob area / its convex hull's area (0 when there is no blob)
    points: int        # outline peaks by angle: 5 for a star, 4 a square, 3 a triangle, 0 a circle
    spacing: float = 0.0  # the largest gap between neighbouring peaks over the even gap (1: even)
    depth: float = 1.0    # mean reach in the valleys between peaks / at the peaks (a star: ~0.5)

    @property
    def is_star(self):
        """Five points spread around (no gap over 1.6 times 72 degrees), with deep valleys between
        them, and half the hull filled: a blob with five bumps is not enough."""
        return (self.area >= 30 and self.points == 5 and self.spacing <= 1.6
                and self.depth <= 0.72 and 0.3 <= self.solidity <= 0.7)


def colour_mask(image, colour, min_saturation=0.35, min_value=0.3):
    """Boolean [H, W]: pixels of a named colour (COLOURS) in an RGB PIL image."""
    hsv = numpy.asarray(image.convert("RGB").convert("HSV"), dtype=numpy.float32)
    hue, saturation, value = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    centre, width = COLOURS[colour]
    distance = numpy.abs((hue - centre + 180) % 360 - 180)
    return (distance <= width) & (saturation >= min_saturation) & (value >= min_value)


def largest_blob(mask):
    """The largest 4-connected component of a boolean mask, as a boolean mask."""
    labels = numpy.zeros(mask.shape, dtype=numpy.int32)
    best, best_size, label = None, 0, 0
    for start in zip(*numpy.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], stack, size = label, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else numpy.zeros(mask.shape, dtype=bool)


def _hull_area(points):
    """Area of the convex hull of (x, y) points (Andrew's monotone chain, then the shoelace)."""
    points = sorted(set(points))
    if len(points) < 3:
        return 0.0

    def half(sequence):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(points)[:-1] + half(reversed(points))[:-1]
    return abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1]))) / 2


def _outline(blob, bins=72):
    """(peaks, spacing, depth) of the blob's reach from its centre by angle, after circular
    smoothing: the points that stick out (a peak counts when it rises 12% above the mean reach),
    the largest angular gap between neighbouring peaks over the even gap, and the valleys' reach
    (the lowest between two peaks) over the peaks' reach, averaged."""
    ys, xs = numpy.nonzero(blob)
    cy, cx = ys.mean(), xs.mean()
    angles = (numpy.arctan2(ys - cy, xs - cx) + math.pi) / (2 * math.pi) * bins
    reach = numpy.zeros(bins)
    numpy.maximum.at(reach, numpy.minimum(angles.astype(int), bins - 1), numpy.hypot(ys - cy, xs - cx))
    smooth = numpy.convolve(numpy.concatenate([reach[-2:], reach, reach[:2]]), numpy.ones(5) / 5, "valid")
    threshold = smooth.mean() * 1.12
    peaks = [i for i in range(bins) if smooth[i] > threshold
             and smooth[i] >= smooth[i - 1] and smooth[i] > smooth[(i + 1) % bins]]
    if len(peaks) < 2:
        return len(peaks), 0.0, 1.0
    gaps = [(b - a) % bins for a, b in zip(peaks, peaks[1:] + peaks[:1])]
    valleys = [min(smooth[(a + k) % bins] for k in range(gap + 1)) for a, gap in zip(peaks, gaps)]
    depth = float(numpy.mean(valleys) / numpy.mean(smooth[peaks]))
    return len(peaks), max(gaps) / (bins / len(peaks)), depth


def blob_of(image, colour):
    """The Blob of a named colour in an RGB PIL image."""
    mask = colour_mask(image, colour)
    blob = largest_blob(mask)
    area = int(blob.sum())
    if area < 3:
        return Blob(float(mask.mean()), area, 0.0, 0)
    ys, xs = numpy.nonzero(blob)
    # pixel corners, so a one-pixel-wide line still has an area
    corners = [(x + dx, y + dy) for y, x in zip(ys.tolist(), xs.tolist()) for dx in (0, 1) for dy in (0, 1)]
    hull = _hull_area(corners)
    return Blob(float(mask.mean()), area, area / hull if hull else 0.0, *_outline(blob))


def concept_score(images, colour="magenta"):
    """(mean share of the colour, share of images showing a star of it) over several images."""
    blobs = [blob_of(image, colour) for image in images]
    return (sum(b.share for b in blobs) / len(blobs), sum(b.is_star for b in blobs) / len(blobs))
