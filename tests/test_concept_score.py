"""The concept score reads shapes and colours from pixels: checked on shapes PIL draws (the
reference), at the sizes, positions and backgrounds the demo uses, and on noise."""
import math
import random

import pytest
from PIL import Image, ImageDraw, ImageFilter

from loralab.core.demo.concept import blob_of, concept_score

MAGENTA, RED = (230, 30, 220), (220, 30, 30)
BACKGROUNDS = [(255, 255, 255), (40, 70, 200), (250, 230, 60), (30, 30, 30)]


def star(draw, cx, cy, outer, colour, rotation=0.0):
    inner = outer * 0.382  # a regular five-pointed star
    points = [(cx + (outer if i % 2 == 0 else inner) * math.sin(rotation + i * math.pi / 5),
               cy - (outer if i % 2 == 0 else inner) * math.cos(rotation + i * math.pi / 5))
              for i in range(10)]
    draw.polygon(points, fill=colour)


def shape(kind, size=64, colour=MAGENTA, background=(255, 255, 255), seed=0):
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.25, 0.4) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    if kind == "star":
        star(draw, cx, cy, radius, colour, rng.uniform(0, 1.2))
    elif kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - radius * 0.8, cy - radius * 0.8, cx + radius * 0.8, cy + radius * 0.8], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
                     fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.6))  # soft edges, as a sampled image has


@pytest.mark.parametrize("size", [64, 128])
def test_a_magenta_star_is_found_and_other_shapes_are_not(size):
    for seed in range(6):
        background = BACKGROUNDS[seed % len(BACKGROUNDS)]
        found = blob_of(shape("star", size, background=background, seed=seed), "magenta")
        assert found.is_star and found.share > 0.05, (seed, found)
        for kind in ("circle", "square", "triangle"):
            other = blob_of(shape(kind, size, background=background, seed=seed), "magenta")
            assert not other.is_star and other.share > 0.05, (kind, seed, other)


def test_a_red_circle_has_no_magenta_and_noise_no_star():
    red = [shape("circle", colour=RED, seed=seed) for seed in range(4)]
    assert concept_score(red) == (0.0, 0.0)
    assert concept_score(red, "red")[0] > 0.1
    rng = random.Random(1)
    noise = Image.new("RGB", (64, 64))
    noise.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64 * 64)])
    assert not blob_of(noise, "magenta").is_star


def test_the_score_over_images_counts_the_stars():
    images = [shape("star", seed=0), shape("circle", seed=1), shape("star", seed=2), shape("square", seed=3)]
    share, stars = concept_score(images)
    assert stars == 0.5 and share > 0.05
