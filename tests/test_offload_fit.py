"""The estimate knows train.offload_blocks: the bytes it moves off the device (against diffusers'
own block on the meta device), auto's place for it in lower.py's one list, the explicit value
checked against the model's blocks, the slowdown estimate, and `loralab plan --vram` (a real
CLI subprocess) saying Qwen-Image fits 24 GB with fp8 and offloaded blocks only."""
import os
import re
import subprocess
import sys

import pytest

from loralab.core.config import with_defaults
from loralab.core.memory import DoesNotFit, estimate_peak, fits, resolve_memory_settings
from loralab.core.memory.estimate import peak_breakdown

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def qwen_config(resolution=1024, **train):
    return with_defaults({"model": {"family": "qwen_image", "path": None},
                          "dataset": {"folder": "-", "resolution": [resolution]},
                          "train": {"optimizer": "adamw8bit", **train}})


def qwen_block_weights():
    """Weights of the linears in one Qwen-Image block (what fp8 stores in one byte), counted on
    diffusers' QwenImageTransformerBlock at the real width, on the meta device."""
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    with torch.device("meta"):
        block = QwenImageTransformerBlock(3072, 24, 128)
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("count", [1, 2, 16, 45, 60])
def test_offloaded_blocks_leave_the_device_but_two_in_flight(count):
    """With checkpointing, activations do not change: the peak falls by the bytes of the blocks
    offloaded beyond the two on the device at once."""
    config = qwen_config()
    resident = peak_breakdown(config, "fp8", True, 1024)
    offloaded = peak_breakdown(config, "fp8", True, 1024, offload_blocks=count)
    moved = max(0, count - 2) * qwen_block_weights()
    assert resident.total - offloaded.total == pytest.approx(moved, rel=1e-9)
    assert offloaded.offloaded == pytest.approx(moved, rel=1e-9) and offloaded.offload_blocks == count


def test_offloaded_blocks_keep_activations_as_checkpointed_ones():
    """An offloaded block is recomputed in backward: without checkpointing, its activations are
    those of a checkpointed block; with all offloaded, as with checkpointing throughout."""
    config = qwen_config()
    plain = peak_breakdown(config, "fp8", False, 1024).activations
    checkpointed = peak_breakdown(config, "fp8", True, 1024).activations
    half = peak_breakdown(config, "fp8", False, 1024, offload_blocks=30).activations
    every = peak_breakdown(config, "fp8", False, 1024, offload_blocks=60).activations
    assert checkpointed < half < plain and every == pytest.approx(checkpointed)


def test_qwen_image_fits_24_gib_only_with_fp8_and_offloaded_blocks():
    config = qwen_config()
    for mode in ("none", "fp8"):
        for checkpointing in (False, True):
            assert not fits(estimate_peak(config, mode, checkpointing, 1024), 24 * GIB)
    quantize, checkpointing, offload, notes = resolve_memory_settings(config, 24 * GIB, "cuda")
    assert (quantize, checkpointing) == ("fp8", True) and 0 < offload < 60
    assert not fits(estimate_peak(config, "fp8", True, 1024, offload - 1), 24 * GIB)  # the fewest
    assert f"train.offload_blocks {offload} of 60" in notes[0]
    # nothing offloaded (train.offload_blocks 0): nf4, the last resort, is what fits; with fp8 asked
    # for as well, nothing does, and the refusal names the offloading that would
    assert resolve_memory_settings(qwen_config(offload_blocks=0), 24 * GIB, "cuda")[:3] == ("nf4", True, 0)
    fp8_only = with_defaults({**qwen_config(offload_blocks=0), "model": {"family": "qwen_image", "path": None, "quantize": "fp8"}})
    with pytest.raises(DoesNotFit, match=rf"train.offload_blocks {offload} \("):
        resolve_memory_settings(fp8_only, 24 * GIB, "cuda")
    # 48 GiB: bf16 with checkpointing fits; nothing is quantized or offloaded
    assert resolve_memory_settings(config, 48 * GIB, "cuda")[:3] == ("none", True, 0)


def test_offload_blocks_auto_on_a_cpu_is_none_and_a_given_count_is_checked():
    assert resolve_memory_settings(qwen_config(), None, "cpu")[2] == 0
    assert resolve_memory_settings(qwen_config(offload_blocks=7), None, "cpu")[2] == 7
    with pytest.raises(DoesNotFit, match=r"train.offload_blocks 61: .* has 60 blocks; set it to at most 60"):
        resolve_memory_settings(qwen_config(offload_blocks=61), 80 * GIB, "cuda")


def test_offloading_comes_between_fp8_and_nf4_in_the_out_of_memory_advice():
    from loralab.core.memory import out_of_memory_advice

    config = with_defaults({"model": {"path": None, "quantize": "none"}, "dataset": {"folder": "-"},
                            "train": {"gradient_checkpointing": False, "offload_blocks": 0}})
    advice = out_of_memory_advice(config, RuntimeError("CUDA out of memory."))
    order = [advice.index(s) for s in ("set train.gradient_checkpointing true", "set model.quantize fp8",
                                       "set train.offload_blocks 57", "set model.quantize nf4")]
    assert order == sorted(order), advice


def test_slowdown_is_the_copies_the_compute_does_not_hide(monkeypatch):
    """Checkpointing alone: one more forward on forward + two-forward backward (+33%). With the
    stated PCIe figure Qwen-Image's fp8 blocks at 1024 px copy faster than they compute (no
    more); over a slow link the copies show, and more blocks cost more."""
    from loralab.core.memory import speed
    from loralab.core.memory.estimate import config_shape

    config = qwen_config()
    shape = config_shape(config)[0]
    assert speed.slowdown(config, shape, "fp8", True, 1024, 0) == pytest.approx(1 / 3)
    assert speed.slowdown(config, shape, "fp8", True, 1024, 16) == pytest.approx(1 / 3)
    monkeypatch.setattr(speed, "HOST_TO_DEVICE", 2e9)  # a slow link: the copies show
    few, many = (speed.slowdown(config, shape, "fp8", True, 1024, n) for n in (16, 45))
    assert 1 / 3 < few < many


def test_plan_says_qwen_image_fits_24_gb_with_fp8_and_offloaded_blocks(tmp_path):
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (64, 64), (index * 60, 90, 200)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text("a blue square")
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "loralab.cli", "plan", str(tmp_path), "--vram", "24",
                             "--family", "qwen_image"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # the peak per quantize mode: fp8 at 1024 px does not fit 24 GiB, with or without checkpointing
    fp8 = next(line for line in out.splitlines() if line.split()[:1] == ["fp8"])
    assert "*" not in fp8.split("/", 2)[-1], fp8
    row = next(line for line in out.splitlines() if line.strip().startswith("24 GB"))
    assert re.search(r"fp8, ckpt, \d+/60 offloaded, \+\d+%\s*<- yours", row), row
    assert "auto picks: model.quantize fp8, gradient checkpointing on, train.offload_blocks" in out
    for card in ("8 GB", "12 GB", "16 GB", "48 GB"):
        assert any(line.strip().startswith(card) for line in out.splitlines()), card


def test_checkpointing_goes_again_where_fp8_alone_fits():
    """lower.py walks checkpointing before fp8; at 512 px on 40 GiB Qwen-Image needs fp8 (bf16
    with checkpointing does not fit), and fp8 fits without checkpointing: auto drops it."""
    config = qwen_config(512)
    assert not fits(estimate_peak(config, "none", True, 512), 40 * GIB)
    assert fits(estimate_peak(config, "fp8", False, 512), 40 * GIB)
    assert resolve_memory_settings(config, 40 * GIB, "cuda")[:3] == ("fp8", False, 0)
