"""Synthetic scenes the shapes model is pretrained on: one coloured circle, square or triangle on
a plain background of another colour, captioned "a red circle on a white background". Pure PIL,
deterministic per seed."""
import random

from PIL import Image, ImageDraw

# Far apart in RGB, so a colour can be told from the pixels (the test scores by nearest colour).
PALETTE = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (30, 160, 50), "blue": (30, 70, 220), "purple": (140, 40, 180),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
MARGIN = 0.1  # of the side: the shape never touches the border, which stays background


def caption(colour, shape, background):
    return f"a {colour} {shape} on a {background} background"


def all_captions():
    return [caption(c, s, b) for c in PALETTE for s in SHAPES for b in PALETTE if b != c]


def draw_scene(colour, shape, background, size=64, center=(0.5, 0.5), extent=0.5):
    """One scene: `extent` is the shape's width as a share of the side, `center` its middle."""
    image = Image.new("RGB", (size, size), PALETTE[background])
    draw = ImageDraw.Draw(image)
    half = extent * size / 2
    cx, cy = center[0] * size, center[1] * size
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=PALETTE[colour])
    elif shape == "square":
        draw.rectangle(box, fill=PALETTE[colour])
    else:  # upright, as wide as tall
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=PALETTE[colour])
    return image


def random_scene(seed, size=64):
    """(image, caption) drawn from `seed`: colours, shape, size (30-60% of the side) and position."""
    rng = random.Random(seed)
    colour, background = rng.sample(list(PALETTE), 2)
    shape = rng.choice(SHAPES)
    extent = rng.uniform(0.3, 0.6)
    room = 1 - 2 * MARGIN - extent  # how far the middle may move and keep the margin
    center = tuple(MARGIN + extent / 2 + rng.uniform(0, room) for _ in range(2))
    return draw_scene(colour, shape, background, size, center, extent), caption(colour, shape, background)
