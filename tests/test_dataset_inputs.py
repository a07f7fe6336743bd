"""Inputs that cost memory or time are bounded, and files are read as they look (issue 20):
captions are read up to a byte limit and cut with a note naming the file, a byte-order mark is
dropped and Latin-1 is not turned into replacement characters; 16-bit greyscale, palettes with
transparency, RGBA/LA and CMYK images train as they look; a GIF, a FIFO, a device or a link out of
the folder is listed as skipped by name, and none of them hangs a scan. Real files on disk."""
import json
import os
import shutil
import tracemalloc

import numpy
import pytest
from PIL import Image

from conftest import run_cli
from loralab.core.dataset import load_for_bucket, scan_folder
from loralab.core.dataset.scan import CAPTION_LIMIT
from loralab.core.trainer import train


def folder_with(tmp_path, captions):
    """A folder of one small image per caption {image name: caption bytes}."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    for name, caption in captions.items():
        Image.new("RGB", (64, 64), "green").save(folder / name)
        (folder / (os.path.splitext(name)[0] + ".txt")).write_bytes(caption)
    return folder


# -- captions ------------------------------------------------------------------------------------

def test_a_huge_caption_is_read_only_up_to_the_limit_and_cut_with_a_note(tmp_path):
    """Old: a 5 MB caption was read whole (1.66 GB while encoding it); 20 MB here."""
    huge = b"word " * (4 << 20)
    folder = folder_with(tmp_path, {"big.png": huge, "small.png": b"a small caption"})
    tracemalloc.start()
    try:
        scan = scan_folder(str(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    big, small = scan.items
    assert len(big.caption.encode()) <= CAPTION_LIMIT and big.caption.startswith("word word")
    assert small.caption == "a small caption"
    assert scan.notes == [("big.txt", scan.notes[0][1])] and f"longer than {CAPTION_LIMIT} bytes" in scan.notes[0][1]


@pytest.mark.parametrize("data, caption, note", [
    (b"\xef\xbb\xbfa photo of sks", "a photo of sks", None),                    # UTF-8 with a BOM
    ("caf\u00e9 cr\u00e8me, na\u00efve".encode("latin-1"), "caf\u00e9 cr\u00e8me, na\u00efve", "not UTF-8"),
    ("\u201cquoted\u201d \u2013 dash".encode("cp1252"), "\u201cquoted\u201d \u2013 dash", "not UTF-8"),
    ("\ufeffZ\u00fcrich".encode("utf-16-le"), "Z\u00fcrich", None),             # Notepad's "Unicode"
    (b"tab\tand\x00nul\r\nline", "tab and nul line", None),                      # control characters
])
def test_caption_bytes_are_decoded_as_written(tmp_path, data, caption, note):
    """Old: the BOM stayed, Latin-1 became U+FFFD, UTF-16 became NULs and replacement characters."""
    scan = scan_folder(str(folder_with(tmp_path, {"a.png": data})))
    assert scan.items[0].caption == caption
    assert [n for _, n in scan.notes if note and note in n] or not (note or scan.notes)


def test_a_caption_cut_inside_a_character_drops_that_character_only(tmp_path):
    data = b"a" * (CAPTION_LIMIT - 1) + "\u00e9\u00e9".encode()  # the limit falls inside the first é
    scan = scan_folder(str(folder_with(tmp_path, {"a.png": data})))
    assert scan.items[0].caption == "a" * (CAPTION_LIMIT - 1)
    assert len(scan.notes) == 1 and "longer than" in scan.notes[0][1]  # cut, and not called Latin-1


def test_a_long_caption_in_training_is_named_and_never_printed_whole(demo_dataset, resolved, tmp_path, capfd):
    """Old: the whole caption went to the text encoders and their truncation warning printed it."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_dataset, folder)
    words = " ".join(f"w{i}" for i in range(200_000))  # 1.3 MB of distinct words
    (folder / "image_000.txt").write_text(words)
    result = train(resolved(dataset={"folder": str(folder)}, train={"steps": 1}))
    assert result.status == "finished"
    assert any(w.startswith("caption file image_000.txt: longer than") for w in result.warnings)
    printed = capfd.readouterr()
    assert len(printed.out) + len(printed.err) < 64 << 10
    assert "w199999" not in printed.out + printed.err


# -- image modes ---------------------------------------------------------------------------------

def pixels(path, size=(64, 64)):
    return numpy.asarray(load_for_bucket(str(path), size), dtype=numpy.float64)


def test_a_16_bit_greyscale_png_trains_as_its_greys_not_white(tmp_path):
    """Old: PIL's convert clipped every value above 255 to white (a mean of 254 here)."""
    ramp = numpy.tile(numpy.linspace(0, 65535, 64), (64, 1)).astype(numpy.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    loaded = pixels(tmp_path / "grey16.png")
    assert abs(loaded.mean() - 127.5) < 3 and loaded[:, 0].mean() < 10 and loaded[:, -1].mean() > 245
    assert numpy.array_equal(loaded[..., 0], loaded[..., 2])  # grey


def half_transparent(mode):
    """A red disc on a fully transparent background whose hidden colour is black."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    for y in range(64):
        for x in range(64):
            if (x - 32) ** 2 + (y - 32) ** 2 < 16 ** 2:
                rgba.putpixel((x, y), (255, 0, 0, 255))
    if mode == "P":
        return _palette(rgba)
    if mode == "LA":
        return rgba.convert("LA")
    return rgba


def _palette(rgba):
    """A palette image whose index 0 (black) is the transparent colour, as GIF-style PNGs are."""
    image = Image.new("P", rgba.size, 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putdata([1 if a else 0 for *_, a in rgba.getdata()])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    """Old: the transparent background trained as black (the colour the pixels hide)."""
    half_transparent(mode).save(tmp_path / "cut_out.png")
    loaded = pixels(tmp_path / "cut_out.png")
    assert (loaded[0, 0] == 255).all() and (loaded[-1, -1] == 255).all()  # corners: white
    centre = loaded[32, 32]
    assert (centre == (255, 0, 0)).all() if mode != "LA" else centre[0] == centre[2] < 200


def test_a_cmyk_jpeg_trains_in_its_colours(tmp_path):
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=95)  # pure cyan
    red, green, blue = pixels(tmp_path / "cyan.jpg").mean(axis=(0, 1))
    assert red < 10 and green > 245 and blue > 245


# -- odd files in a dataset folder ---------------------------------------------------------------

def test_odd_files_are_listed_by_name_and_never_hang(tmp_path, demo_dataset):
    """Old: the GIF, the FIFO and the device were left out without a word, and the link to a file
    outside the folder was trained on."""
    folder = tmp_path / "data"
    shutil.copytree(demo_dataset, folder)
    Image.new("RGB", (64, 64), "red").save(folder / "animation.gif")
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "image_001.txt.tmp")  # not a caption: ignored
    (folder / "image_002.txt").unlink()
    os.mkfifo(folder / "image_002.txt")        # a FIFO where a caption is: not read
    os.symlink("/dev/zero", folder / "zero.jpg")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64), "blue").save(outside)
    os.symlink(outside, folder / "elsewhere.png")
    os.symlink(folder / "image_000.jpg", folder / "again.jpg")  # inside the folder: a file like any
    done = run_cli("plan", str(folder), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = {line.split(":")[0].strip(): line for line in done.stdout.splitlines()
               if line.strip().startswith("skipped ")}
    assert set(skipped) == {"skipped animation.gif", "skipped pipe.png", "skipped zero.jpg",
                            "skipped elsewhere.png"}, done.stdout
    assert "a .gif image" in skipped["skipped animation.gif"]
    assert "not a regular file" in skipped["skipped pipe.png"]
    assert "outside the dataset folder" in skipped["skipped elsewhere.png"]
    assert "outside the dataset folder" in skipped["skipped zero.jpg"]
    assert "images: 7 found, 4 skipped" in done.stdout
    assert "image_002.txt: not a regular file" in done.stdout
    scan = scan_folder(str(folder))
    assert scan.missing_captions == ["again.jpg", "image_002.jpg"]


# -- SampleGrid's strengths ----------------------------------------------------------------------

def test_sample_grid_refuses_strengths_that_are_not_finite_or_out_of_range(tmp_path):
    """Old: nan, inf and 1e308 were taken, and drew NaN or blown-out columns after the training.
    Validation answers before anything runs, one line per SampleGrid, naming the input."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "workflows", "quickstart.json")) as f:
        graph = json.load(f)
    bad = {"6": "0,nan", "60": "inf", "61": "0,1e308", "62": ",".join(["1"] * 17)}
    for node, strengths in bad.items():
        graph[node] = {**graph["6"], "inputs": {**graph["6"]["inputs"], "strengths": strengths}}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(graph))
    done = run_cli("run", str(path), timeout=120, cwd=str(tmp_path))  # output: ./output
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = {node: [line for line in done.stderr.splitlines() if f"node {node} " in line] for node in bad}
    assert all(len(found) == 1 and "strengths" in found[0] for found in lines.values()), done.stderr
    assert "nan is not a number from -10 to 10" in lines["6"][0]
    assert "inf is not a number from -10 to 10" in lines["60"][0]
    assert "1e+308 is not a number from -10 to 10" in lines["61"][0]
    assert "17 strengths; a grid takes 1 to 16" in lines["62"][0]
    assert not os.path.exists(tmp_path / "output")  # nothing ran
