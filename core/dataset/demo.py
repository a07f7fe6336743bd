"""A small demo dataset the project draws itself (the quickstart and the tests use it): simple
scenes of one subject, a red circle "sks", on varied backgrounds, with captions."""
import os
import random

from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = ["blue", "green", "white", "black", "yellow", "gray", "purple", "orange"]


def make_demo_dataset(folder, count=6, size=(96, 96), seed=0, caption_ext="txt"):
    """Writes `count` images with [trigger] captions into `folder`; returns the folder."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        background = BACKGROUNDS[index % len(BACKGROUNDS)]
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):  # some texture so the images are not near-duplicates
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            draw.rectangle([x, y, x + size[0] // 6, y + size[1] // 8],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        radius = min(size) // 4 + rng.randrange(-4, 5)
        cx = size[0] // 2 + rng.randrange(-8, 9)
        cy = size[1] // 2 + rng.randrange(-8, 9)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill="red", outline="darkred")
        image = image.filter(ImageFilter.SMOOTH)
        stem = os.path.join(folder, f"image_{index:03d}")
        image.save(stem + (".png" if index % 2 else ".jpg"))
        with open(f"{stem}.{caption_ext}", "w", encoding="utf-8") as f:
            f.write(f"a photo of [trigger] on a {background} background")
    return folder
