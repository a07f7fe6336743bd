"""Real image files as phones and interrupted copies leave them: a portrait photo stored landscape
with EXIF orientation 6 trains in a portrait bucket the right way up (scan, plan, buckets and
loading agree), and a half-written JPEG is skipped by name at scan, never met while caching."""
import os
import re

import pytest
import torch
from PIL import Image, ImageFile

from loralab.core.coach.plan import plan_dataset, plan_report
from loralab.core.dataset import Cache, DatasetError, image_sizes, load_for_bucket, scan_folder

ORIENTATION = 0x0112
UPRIGHT = (320, 480)            # the scene as the phone's user saw it: portrait
MARKER = (0, 0, 100, 100)       # a red square in the scene's top-left corner, on blue
RESOLUTION, MULTIPLE = 256, 16  # FLUX.1's bucket multiple


def reddish(pixel):
    red, green, blue = pixel
    return red > 180 and blue < 90 and green < 90


def bluish(pixel):
    red, green, blue = pixel
    return blue > 180 and red < 90 and green < 90


def write_phone_photo(path):
    """A JPEG stored as a phone stores a portrait shot: pixels turned a quarter turn to the left
    (landscape) with EXIF orientation 6, 'turn 90 degrees clockwise to show'."""
    scene = Image.new("RGB", UPRIGHT, (0, 0, 255))
    scene.paste((255, 0, 0), MARKER)
    stored = scene.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as check:  # the file itself is landscape: what a naive reader measures
        assert check.size == (UPRIGHT[1], UPRIGHT[0]) and check.getexif()[ORIENTATION] == 6


def write_truncated_jpeg(path, size=(240, 180)):
    """A real JPEG (noise, so its data is large) cut to half its bytes, as a copy that stopped
    half way leaves it."""
    Image.effect_noise(size, 64).convert("RGB").save(path, quality=90)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def write_caption(folder, name, caption):
    with open(os.path.join(folder, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write(caption)


@pytest.fixture
def phone_folder(tmp_path):
    folder = tmp_path / "phone"
    folder.mkdir()
    write_phone_photo(str(folder / "portrait.jpg"))
    write_caption(str(folder), "portrait.jpg", "a photo of [trigger]")
    return str(folder)


@pytest.fixture
def truncated_folder(tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    Image.new("RGB", (96, 64), "green").save(folder / "good.png")
    write_caption(str(folder), "good.png", "a green field")
    write_truncated_jpeg(str(folder / "half.jpg"))
    write_caption(str(folder), "half.jpg", "never trained")
    return str(folder)


def test_exif_rotated_photo_is_portrait_at_scan(phone_folder):
    item, = scan_folder(phone_folder, "txt", "sks").items
    assert (item.width, item.height) == UPRIGHT
    width, height = image_sizes([item], [RESOLUTION], MULTIPLE)[0][0]
    assert height > width


def test_exif_rotated_photo_is_portrait_in_the_plan(phone_folder):
    plan = plan_dataset(phone_folder, {"dataset": {"resolution": [RESOLUTION]}})
    assert dict(plan.sizes) == {UPRIGHT: 1}
    (bucket, count), = plan.buckets[RESOLUTION].items()
    assert count == 1 and bucket[1] > bucket[0]
    report = plan_report(plan)
    assert f"image sizes: {UPRIGHT[0]}x{UPRIGHT[1]} (1)" in report
    assert f"buckets at {RESOLUTION}: {bucket[0]}x{bucket[1]} (1)" in report


def test_exif_rotated_photo_loads_portrait_and_upright(phone_folder):
    item, = scan_folder(phone_folder).items
    size = image_sizes([item], [RESOLUTION], MULTIPLE)[0][0]
    image = load_for_bucket(item.path, size)
    assert image.size == size and size[1] > size[0]
    width, height = image.size
    # The marker is where the user saw it: top-left, and nowhere else.
    assert reddish(image.getpixel((5, 5)))
    assert bluish(image.getpixel((width - 6, 5)))
    assert bluish(image.getpixel((5, height - 6)))
    assert bluish(image.getpixel((width - 6, height - 6)))


def test_exif_rotated_photo_reaches_the_cache_portrait_and_upright(phone_folder):
    scan = scan_folder(phone_folder)
    sizes = image_sizes(scan.items, [RESOLUTION], MULTIPLE)
    seen = []

    def encode_image(image):
        seen.append(image)
        return torch.zeros(1)

    Cache().fill(scan.items, sizes, [""], encode_image, lambda texts: {t: (torch.zeros(1), torch.zeros(1)) for t in texts}, "m")
    image, = seen
    assert image.size == sizes[0][0] and image.height > image.width
    assert reddish(image.getpixel((5, 5))) and bluish(image.getpixel((image.width - 6, image.height - 6)))


def test_truncated_jpeg_passes_verify_but_is_skipped_at_scan_by_name(truncated_folder):
    path = os.path.join(truncated_folder, "half.jpg")
    with Image.open(path) as image:
        image.verify()  # the check the scan used to rely on lets it through
    scan = scan_folder(truncated_folder)
    assert [os.path.basename(i.path) for i in scan.items] == ["good.png"]
    (name, reason), = scan.skipped
    assert name == "half.jpg" and "cannot be read" in reason and "truncated" in reason
    assert "skipped half.jpg: cannot be read" in plan_report(scan, {"dataset": {"resolution": [RESOLUTION]}})


def test_truncated_jpeg_never_reaches_the_cache(truncated_folder):
    scan = scan_folder(truncated_folder)
    sizes = image_sizes(scan.items, [64], MULTIPLE)
    seen = []

    def encode_image(image):
        seen.append(image.size)
        return torch.zeros(1)

    cache = Cache()
    cache.fill(scan.items, sizes, [i.caption for i in scan.items], encode_image,
               lambda texts: {t: (torch.zeros(1), torch.zeros(1)) for t in texts}, "m")
    assert len(seen) == 1 and cache.computed == 2  # good.png's latent and its caption
    assert "never trained" not in cache.texts


def test_image_damaged_after_the_scan_fails_by_name_at_cache_time(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.effect_noise((240, 180), 64).convert("RGB").save(folder / "later.jpg", quality=90)
    scan = scan_folder(str(folder))
    write_truncated_jpeg(str(folder / "later.jpg"))  # overwritten half way after the scan
    sizes = image_sizes(scan.items, [64], MULTIPLE)
    with pytest.raises(DatasetError, match=r"later\.jpg cannot be loaded .*replace it, or remove it"):
        Cache().fill(scan.items, sizes, [], lambda image: torch.zeros(1), lambda texts: {}, "m")


def test_truncated_images_are_never_loaded_padded():
    """Nothing in the project turns on PIL's LOAD_TRUNCATED_IMAGES, which would pad a half-written
    JPEG with grey and let it through the scan."""
    import loralab.core.coach.plan  # noqa: F401
    import loralab.core.dataset  # noqa: F401
    import loralab.core.trainer.loop  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setters = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if not s.startswith(".") and s != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    if re.search(r"LOAD_TRUNCATED_IMAGES\s*=(?!=)", f.read()):
                        setters.append(os.path.join(folder, name))
    assert setters == []
