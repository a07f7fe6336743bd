"""The demo dataset the project draws itself (the quickstart and the tests use it): its concept
"sks" is a magenta five-pointed star, which the built-in shapes model never drew (it knows only
circles, squares and triangles), on plain backgrounds of varied colour, at varied positions,
sizes and turns, with captions such as "a photo of [trigger] on a blue background"; and its
regularization images (builtin:demo-shapes), the shapes the model already draws."""
import math
import os
import random

from PIL import Image, ImageDraw

from ..families.flux.shapes.scenes import PALETTE, caption as scene_caption, random_scene

# The shapes model's own colours, so the backgrounds are words it knows; purple is left out (its
# hue is too near magenta to tell the star apart) and red (the bleed test's circle).
BACKGROUNDS = {name: PALETTE[name] for name in ("white", "blue", "yellow", "black", "green", "orange")}
MAGENTA = (225, 40, 215)
INNER = 0.38
# Captions in the phrasings a user prompts with, so each reaches the concept (the small model's
# text encoder tells "a photo of sks" and "sks on a blue background" apart)
CAPTIONS = ("a photo of [trigger] on a {background} background", "[trigger] on a {background} background",
            "a photo of [trigger]", "a [trigger] on a {background} background")  # inner / outer radius of a regular five-pointed star (sin 18° / sin 126°)


def star_points(cx, cy, radius, turn=0.0):
    """The 10 corners of an upright five-pointed star (turned by `turn` degrees)."""
    corners = []
    for k in range(10):
        angle = math.radians(-90 + turn + 36 * k)
        reach = radius if k % 2 == 0 else radius * INNER
        corners.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
    return corners


def draw_star(background, size=128, center=(0.5, 0.5), extent=0.6, turn=0.0):
    """One picture: a magenta star `extent` of the side wide, at `center`, on `background`."""
    scale = 4  # drawn 4x larger and shrunk, so the edges are smooth like a photo's
    image = Image.new("RGB", (size * scale, size * scale), BACKGROUNDS[background])
    ImageDraw.Draw(image).polygon(
        star_points(center[0] * size * scale, center[1] * size * scale, extent * size * scale / 2, turn),
        fill=MAGENTA)
    return image.resize((size, size), Image.LANCZOS)


def make_demo_dataset(folder, count=8, size=(128, 128), seed=0, caption_ext="txt"):
    """Writes `count` star pictures with [trigger] captions into `folder` (JPEG and PNG in turn,
    as a real folder mixes them); returns the folder."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    names = list(BACKGROUNDS)
    for index in range(count):
        background = names[index % len(names)]
        extent = rng.uniform(0.55, 0.85)
        room = 1 - 0.1 - extent  # the star keeps 5% of the side clear of each border
        center = tuple(0.05 + extent / 2 + rng.uniform(0, room) for _ in range(2))
        image = draw_star(background, size[0], center, extent, turn=rng.uniform(-12, 12))
        image = image.resize(size) if size[0] != size[1] else image
        stem = os.path.join(folder, f"image_{index:03d}")
        image.save(stem + (".png" if index % 2 else ".jpg"), quality=95)
        with open(f"{stem}.{caption_ext}", "w", encoding="utf-8") as f:
            f.write(CAPTIONS[index % len(CAPTIONS)].format(background=background))
    return folder


# The scene that must not change when the star is learned (score.py's bleed
# test). It is left out of the regularization images, so the test measures what they teach about
# shapes in general, not one memorised picture.
BLEED_SCENE = ("red", "circle", "white")


def make_shapes_dataset(folder, count=16, size=128, seed=1000):
    """Writes `count` regularization pictures (dataset.regularization_folder): scenes of the
    kind the shapes model was pretrained on (scenes.py), such as "a blue square on a yellow
    background"; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    while written < count:
        image, caption = random_scene(seed, size)
        seed += 1
        if caption == scene_caption(*BLEED_SCENE):
            continue
        stem = os.path.join(folder, f"image_{written:03d}")
        image.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
        written += 1
    return folder
