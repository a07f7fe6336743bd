"""Dataset folder scanning, captions and triggers, buckets, batch order and the cache."""
import os

import pytest
import torch
from PIL import Image

from loralab.core.dataset import (BatchPlan, Cache, DatasetError, apply_trigger, bucket_size,
                                  image_sizes, scan_folder)


def write_image(folder, name, size=(80, 60), color="red", caption=None, ext="txt"):
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", size, color).save(os.path.join(folder, name))
    if caption is not None:
        with open(os.path.join(folder, os.path.splitext(name)[0] + "." + ext), "w") as f:
            f.write(caption)


def test_captions_trigger_and_missing(tmp_path):
    folder = str(tmp_path / "data")
    write_image(folder, "a.png", caption="a photo of [trigger] in a park")
    write_image(folder, "b.jpg", caption="a dog on grass")
    write_image(folder, "c.webp")  # no caption file
    write_image(folder, "d.jpeg", caption="ohwx  smiling\n")
    (tmp_path / "data" / "notes.md").write_text("not an image")
    scan = scan_folder(folder, "txt", "ohwx")
    captions = {os.path.basename(i.path): i.caption for i in scan.items}
    assert captions == {"a.png": "a photo of ohwx in a park", "b.jpg": "ohwx, a dog on grass",
                        "c.webp": "ohwx", "d.jpeg": "ohwx smiling"}
    assert scan.missing_captions == ["c.webp"]
    assert apply_trigger("[trigger] style", "") == "style"


def test_custom_caption_extension(tmp_path):
    folder = str(tmp_path / "data")
    write_image(folder, "a.png", caption="from caption file", ext="caption")
    assert scan_folder(folder, ".caption").items[0].caption == "from caption file"


def test_unreadable_image_is_reported_by_name(tmp_path):
    folder = str(tmp_path / "data")
    write_image(folder, "good.png", caption="fine")
    (tmp_path / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    scan = scan_folder(folder)
    assert [os.path.basename(i.path) for i in scan.items] == ["good.png"]
    assert scan.skipped[0][0] == "broken.jpg" and "cannot be read" in scan.skipped[0][1]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found: .*nowhere"):
        scan_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable image .*empty"):
        scan_folder(str(tmp_path / "empty"))
    (tmp_path / "only_broken").mkdir()
    (tmp_path / "only_broken" / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="x.png: cannot be read"):
        scan_folder(str(tmp_path / "only_broken"))


@pytest.mark.parametrize("width, height, resolution, multiple", [
    (1024, 1024, 512, 16), (1920, 1080, 1024, 16), (600, 900, 768, 16), (300, 200, 64, 8)])
def test_buckets_keep_area_aspect_and_multiple(width, height, resolution, multiple):
    bucket_width, bucket_height = bucket_size(width, height, resolution, multiple)
    assert bucket_width % multiple == 0 and bucket_height % multiple == 0
    assert bucket_width * bucket_height <= resolution * resolution
    assert bucket_width * bucket_height >= 0.8 * resolution * resolution
    assert abs(bucket_width / bucket_height - width / height) < 0.1 * width / height


def test_small_images_are_not_upscaled():
    assert bucket_size(300, 200, 1024, 16) == (288, 192)


def test_batch_plan_shows_every_image_repeats_times_per_epoch():
    sizes = {i: [(64, 64), (96, 96)] for i in range(5)}
    plan = BatchPlan(sizes, repeats=2, batch_size=1, seed=3)
    epoch = plan.epoch(0)
    assert len(epoch) == 10
    assert sorted(b[0].image for b in epoch) == sorted(list(range(5)) * 2)
    assert {b[0].size for b in epoch} == {(64, 64), (96, 96)}  # resolutions alternate
    again = BatchPlan(sizes, repeats=2, batch_size=1, seed=3)
    assert [again.batch(p) for p in range(25)] == [plan.batch(p) for p in range(25)]
    assert plan.epoch_of(10) == 1


def test_batches_hold_one_bucket():
    sizes = {0: [(64, 64)], 1: [(64, 64)], 2: [(48, 80)], 3: [(48, 80)], 4: [(64, 64)]}
    plan = BatchPlan(sizes, repeats=1, batch_size=2, seed=0)
    for batch in plan.epoch(0):
        assert len({e.size for e in batch}) == 1


def test_disk_cache_key_changes_with_image_and_caption(tmp_path):
    folder = str(tmp_path / "data")
    write_image(folder, "a.png", caption="first")
    scan = scan_folder(folder)
    sizes = image_sizes(scan.items, [32], 8)
    encode_image = lambda image: torch.full((1, image.height // 8, image.width // 8),  # [C, h, w]
                                            float(image.getpixel((0, 0))[0]))
    encode_texts = lambda texts: {t: (torch.zeros(2, 3), torch.zeros(3)) for t in texts}

    def fill(model_key="m1"):
        cache = Cache(str(tmp_path / "cache"))
        cache.fill(scan.items, sizes, [scan.items[0].caption, ""], encode_image, encode_texts, model_key)
        return cache

    assert fill().computed == 3          # one latent, two captions
    assert fill().computed == 0          # all read back from disk
    assert fill("m2").computed == 3      # another model: new keys
    write_image(folder, "a.png", color="blue", caption="first")
    cache = fill()
    assert cache.computed == 1 and cache.latent(0, sizes[0][0])[0, 0, 0].item() == 0.0  # blue: red = 0


@pytest.mark.parametrize("width, height, size", [(300, 100, (64, 64)), (100, 300, (64, 64)),
                                                 (640, 480, (96, 48)), (480, 640, (48, 96)),
                                                 (200, 200, (64, 64))])
def test_crop_top_left_is_where_pils_fit_cuts(width, height, size):
    """SDXL's crop conditioning must name the crop that load_for_bucket (ImageOps.fit) really
    takes: a ramp image shows it, since each source column/row carries its own coordinate."""
    import numpy as np
    from PIL import ImageOps

    from loralab.core.dataset.buckets import crop_top_left

    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    ramp = Image.fromarray(np.stack([columns % 256, rows % 256, columns // 256 * 64 + rows // 256 * 8],
                                    -1).astype(np.uint8))
    fitted = np.asarray(ImageOps.fit(ramp, size, method=Image.Resampling.NEAREST)).astype(int)
    first_column = fitted[0, 0, 0] + fitted[0, 0, 2] // 64 * 256  # source x of the kept corner
    first_row = fitted[0, 0, 1] + fitted[0, 0, 2] % 64 // 8 * 256
    scale = max(size[0] / width, size[1] / height)
    top, left = crop_top_left(width, height, size)
    assert abs(left - first_column * scale) <= 1 and abs(top - first_row * scale) <= 1
