"""The Monitor's detectors on made-up loss sequences and made-up images: each sign fires on a
case made to show it and stays silent on one made not to."""
import json
import math
import random

import numpy
import pytest
from PIL import Image, ImageFilter

from loralab.core.coach import loss_signs, sample_signs
from loralab.core.coach.monitor import Monitor
from loralab.core.runs import RunFolder


def noisy(values, spread=0.05, seed=0):
    rng = random.Random(seed)
    return [v + rng.gauss(0, spread) for v in values]


def falling(count, seed=0):
    return noisy([0.5 + 0.5 * math.exp(-i / (count / 3)) for i in range(count)], seed=seed)


# -- loss: not going down -----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_flat_loss_is_not_going_down(seed):
    assert loss_signs.not_going_down(noisy([1.0] * 40, seed=seed))


@pytest.mark.parametrize("seed", range(20))
def test_falling_loss_is_going_down(seed):
    assert not loss_signs.not_going_down(falling(40, seed=seed))


def test_a_quick_fall_then_a_plateau_counts_as_going_down():
    assert not loss_signs.not_going_down(noisy([1.2, 0.9, 0.7] + [0.55] * 37, spread=0.05))


def test_rising_loss_has_negative_trend():
    assert loss_signs.trend(noisy([1.0 + 0.02 * i for i in range(40)]))[2] < -loss_signs.FLAT_T


def test_too_few_values_say_nothing():
    assert not loss_signs.not_going_down([1.0] * (loss_signs.MIN_TREND_LINES - 1))
    assert loss_signs.not_going_down([1.0] * loss_signs.MIN_TREND_LINES)  # constant: flat


# -- loss: jumps ----------------------------------------------------------------------------

def test_a_jump_far_above_the_noise_is_a_spike():
    values = noisy([1.0] * 40)
    values[25] = 1.8
    assert [i for i in range(40) if loss_signs.is_spike(values, i)] == [25]


@pytest.mark.parametrize("seed", range(20))
def test_noise_alone_has_no_spike(seed):
    values = falling(60, seed=seed)
    assert not any(loss_signs.is_spike(values, i) for i in range(60))


def test_a_small_bump_on_a_very_steady_curve_is_not_a_spike():
    values = [1.0 + 0.0001 * (i % 2) for i in range(30)]
    values[15] = 1.1  # many noise units, but only 10% up
    assert not loss_signs.is_spike(values, 15)


# -- the Monitor on metrics lines -------------------------------------------------------------

def monitor_of(tmp_path, images=()):
    """A Monitor of the run folder <tmp_path>/run training on `images` (paths), as the loop makes it."""
    return Monitor(RunFolder(str(tmp_path), "run"), images)


def feed(monitor, values, first_step=1):
    found = []
    for step, value in enumerate(values, first_step):
        found += monitor.on_log({"step": step, "loss": value})
    return found


def test_monitor_reports_a_nan_loss_once(tmp_path):
    monitor = monitor_of(tmp_path)
    found = feed(monitor, [1.0, 0.9, float("nan"), float("inf")])
    assert len(found) == 1 and "step 3 is nan" in found[0] and "last good checkpoint" in found[0]


def test_monitor_reports_the_first_jump_then_counts_them_at_the_end(tmp_path):
    values = falling(60)
    values[25] = values[40] = 2.0
    monitor = monitor_of(tmp_path)
    found = feed(monitor, values)
    assert len(found) == 1 and "jumped at step 26" in found[0]
    found = monitor.finish()
    assert len(found) == 1 and "jumped 2 times in all (steps 26, 41)" in found[0]


def test_monitor_is_silent_on_a_falling_loss(tmp_path):
    monitor = monitor_of(tmp_path)
    assert feed(monitor, falling(80)) == [] and monitor.finish() == []


def test_monitor_warns_once_about_a_flat_loss(tmp_path):
    monitor = monitor_of(tmp_path)
    found = feed(monitor, noisy([1.0] * 80)) + monitor.finish()
    assert len(found) == 1 and "has not gone down between steps 1 and 20" in found[0]


def test_a_flat_loss_with_changing_samples_says_the_lora_learns(tmp_path):
    monitor = monitor_of(tmp_path)
    monitor.on_samples(0, [picture(1)])
    monitor.on_samples(10, [picture(2)])
    found = feed(monitor, noisy([1.0] * 20))
    assert len(found) == 1 and "but the samples do change" in found[0]


def test_a_rising_loss_says_went_up(tmp_path):
    monitor = monitor_of(tmp_path)
    found = feed(monitor, noisy([1.0 + 0.02 * i for i in range(20)]))
    assert len(found) == 1 and "the loss went up between steps 1 and 20" in found[0]


def test_a_resumed_monitor_continues_the_curve_on_disk(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    values = noisy([1.0] * 30)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                  for i, v in enumerate(values)))
    monitor = monitor_of(tmp_path)
    assert len(monitor.losses) == 30
    found = feed(monitor, noisy([1.0] * 15, seed=1), first_step=31)  # the 40-line check: flat
    assert any("between steps 1 and 40" in warning for warning in found)


# -- samples ------------------------------------------------------------------------------

def picture(seed, size=64):
    """A detailed made-up picture: random colour blocks with edges."""
    rng = numpy.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=numpy.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


def shifted(image, amount):
    """The same picture, a little different (every pixel moved by `amount` grey levels)."""
    return Image.fromarray(numpy.clip(numpy.asarray(image, dtype=numpy.int16) + amount, 0, 255).astype(numpy.uint8))


def with_noise(image, spread, seed=0):
    rng = numpy.random.default_rng(seed)
    pixels = numpy.asarray(image, dtype=numpy.float32) + rng.normal(0, spread, (image.height, image.width, 3))
    return Image.fromarray(numpy.clip(pixels, 0, 255).astype(numpy.uint8))


def test_samples_equal_to_the_base_at_two_samplings_are_unchanged():
    base = sample_signs.Sampling(0, [picture(1), picture(2)])
    same = sample_signs.change_from_base(sample_signs.Sampling(10, [picture(1), picture(2)]), base)
    moved = sample_signs.change_from_base(sample_signs.Sampling(10, [shifted(picture(1), 5), picture(2)]), base)
    assert same == 0 and moved == pytest.approx(5, abs=0.5)
    assert not sample_signs.unchanged([same])          # one sampling is too early to tell
    assert sample_signs.unchanged([same, same])
    assert not sample_signs.unchanged([same, moved])


def test_samples_of_different_prompts_collapsing_into_one():
    base = sample_signs.Sampling(0, [picture(1), picture(2), picture(3)])
    collapsed = sample_signs.Sampling(50, [picture(4), shifted(picture(4), 2), shifted(picture(4), -2)])
    varied = sample_signs.Sampling(50, [picture(5), picture(6), picture(7)])
    now, then = sample_signs.prompts_collapsed(collapsed, base)
    assert now < 3 and then > 50
    assert sample_signs.prompts_collapsed(varied, base) is None


def test_prompts_already_alike_at_base_are_not_judged():
    base = sample_signs.Sampling(0, [picture(1), shifted(picture(1), 1)])
    assert sample_signs.prompts_collapsed(sample_signs.Sampling(9, [picture(2), picture(2)]), base) is None


def test_a_sample_copying_a_training_image_is_memorized():
    training = [sample_signs.training_signature(picture(seed)) for seed in (10, 11, 12)]
    base = sample_signs.Sampling(0, [picture(1), picture(2)])
    copied = sample_signs.Sampling(90, [picture(2), with_noise(picture(11), 8)])
    assert sample_signs.memorized(copied, base, training)[:2] == (1, 1)
    assert sample_signs.memorized(sample_signs.Sampling(90, [picture(3), picture(4)]), base, training) is None


def test_a_base_sample_that_already_looks_like_a_training_image_is_not_memorized():
    training = [sample_signs.training_signature(picture(10))]
    base = sample_signs.Sampling(0, [shifted(picture(10), 3)])
    assert sample_signs.memorized(sample_signs.Sampling(9, [picture(10)]), base, training) is None


def test_blurry_and_noisy_samples_against_the_base():
    base = sample_signs.Sampling(0, [picture(1, 256), picture(2, 256)])

    def ratio(images):
        return sample_signs.sharpness_ratio(sample_signs.Sampling(9, images), base)

    blurred = [picture(s, 256).filter(ImageFilter.GaussianBlur(4)) for s in (1, 2)]
    assert ratio(blurred) < sample_signs.BLURRY_RATIO
    smooth_base = sample_signs.Sampling(0, [picture(1, 256).filter(ImageFilter.GaussianBlur(2))])
    noisy_image = with_noise(picture(1, 256).filter(ImageFilter.GaussianBlur(2)), 40)
    assert sample_signs.sharpness_ratio(sample_signs.Sampling(9, [noisy_image]), smooth_base) > sample_signs.NOISY_RATIO
    healthy = [shifted(picture(1, 256), 10), with_noise(picture(2, 256), 3)]
    assert sample_signs.BLURRY_RATIO < ratio(healthy) < sample_signs.NOISY_RATIO


# -- the Monitor on samples -------------------------------------------------------------------

def test_monitor_sample_warnings_each_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    picture(11, 96).save(data / "a.png")
    picture(12, 96).save(data / "b.png")
    monitor = monitor_of(tmp_path, [str(data / "a.png"), str(data / "b.png")])
    assert monitor.on_samples(0, [picture(1), picture(2)]) == []
    assert monitor.on_samples(10, [picture(1), picture(2)]) == []  # unchanged once: too early
    found = monitor.on_samples(20, [picture(1), picture(2)])
    assert len(found) == 1 and "steps 10, 20 look the same as the base" in found[0]
    copied = [with_noise(picture(12, 64), 5), with_noise(picture(12, 64), 5, seed=1)]
    found = monitor.on_samples(30, copied)
    assert any("nearly a copy of training image b.png" in w for w in found)
    assert any("different prompts look nearly the same" in w for w in found)
    assert monitor.on_samples(40, copied) == []
    blurred = [p.filter(ImageFilter.GaussianBlur(6)) for p in copied]
    assert any("blurrier" in w for w in monitor.on_samples(50, blurred))


def test_a_resumed_monitor_reads_the_base_samples_from_the_run_folder(tmp_path):
    folder = tmp_path / "run" / "samples" / "000000000"
    folder.mkdir(parents=True)
    for index, seed in enumerate((1, 2)):
        picture(seed).save(folder / f"{index:02d}_s1.png")
    monitor = monitor_of(tmp_path)
    assert monitor.on_samples(250, [picture(1), picture(2)]) == []
    assert monitor.base is not None and monitor.changes == [(250, 0.0)]


def test_monitor_without_base_samples_stays_silent(tmp_path):
    monitor = monitor_of(tmp_path)
    assert monitor.on_samples(250, [picture(1)]) == [] and monitor.base is None


def test_training_images_that_cannot_be_read_are_left_out(tmp_path):
    picture(11, 96).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    monitor = monitor_of(tmp_path, [str(tmp_path / "broken.png"), str(tmp_path / "a.png")])
    assert len(monitor._training_arrays()) == 1 and monitor._training_names == ["a.png"]
