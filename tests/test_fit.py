"""Will it fit: the verdicts for FLUX.1-dev's shape on 24 and 12 GiB cards, the auto choices, the
DoesNotFit message, and the activation estimate against a peak measured on the CPU."""
import json
import os
import subprocess
import sys

import pytest

from loralab.core.config import with_defaults
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.flux.memory import FLUX_DEV, block_linear_parameters
from loralab.core.memory import DoesNotFit, estimate_peak, fit_report, fits, resolve_memory_settings

activation_bytes = flux.memory.activation_bytes

GIB = 2**30


def dev_config(**sections):
    """FLUX.1-dev shapes (no model folder), rank 16, batch 1, the schema's defaults."""
    sections.setdefault("dataset", {}).setdefault("resolution", [512, 1024])
    return with_defaults({"model": {"path": None}, **sections})


def test_block_linears_are_what_fp8_stores():
    """The parameter count fp8/bitsandbytes quantize, against the real module tree (meta)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from torch import nn

    from loralab.core.families.parts.fp8 import is_block_linear

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    counted = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and is_block_linear(name))
    assert block_linear_parameters(FLUX_DEV) == counted


@pytest.mark.parametrize("resolution", [512, 1024])
def test_bf16_base_does_not_fit_24_gib(resolution):
    for checkpointing in (False, True):
        assert not fits(estimate_peak(dev_config(), "none", checkpointing, resolution), 24 * GIB)


def test_rank_16_at_1024_fits_24_gib_with_a_quantized_base():
    config = dev_config()
    for mode in ("fp8", "int8", "nf4"):
        assert fits(estimate_peak(config, mode, True, 1024), 24 * GIB), mode
    assert resolve_memory_settings(config, 24 * GIB, "cuda")[:2] == ("fp8", True)


def test_fp8_without_checkpointing_costs_less_than_bf16():
    """Float8Linear saves only its fp8 weight for backward: one layer's bf16 copy at a time, as
    bitsandbytes, not a bf16 copy of every block linear."""
    config = dev_config()
    for resolution in (512, 1024):
        for checkpointing in (False, True):
            fp8 = estimate_peak(config, "fp8", checkpointing, resolution)
            assert fp8 < estimate_peak(config, "none", checkpointing, resolution) - 10 * GIB
            assert fp8 == estimate_peak(config, "int8", checkpointing, resolution)


def test_512_on_12_gib_offloads_fp8_blocks_before_a_4_bit_base():
    """lower.py's order: fp8 and checkpointing, then offloaded blocks (only speed), then nf4
    (which changes what the LoRA learns against); nf4 alone fits where nothing is offloaded."""
    config = dev_config(dataset={"resolution": [512]})
    assert fits(estimate_peak(config, "nf4", True, 512), 12 * GIB)
    assert not fits(estimate_peak(config, "fp8", True, 512), 12 * GIB)
    quantize, checkpointing, offload, _ = resolve_memory_settings(config, 12 * GIB, "cuda")
    assert (quantize, checkpointing) == ("fp8", True) and 0 < offload < 57
    assert fits(estimate_peak(config, "fp8", True, 512, offload), 12 * GIB)
    assert not fits(estimate_peak(config, "fp8", True, 512, offload - 1), 12 * GIB)  # the fewest
    kept = dev_config(dataset={"resolution": [512]}, train={"offload_blocks": 0})
    assert resolve_memory_settings(kept, 12 * GIB, "cuda")[:3] == ("nf4", True, 0)


def test_checkpointing_stays_off_when_the_step_fits_without_it():
    config = dev_config(dataset={"resolution": [512]})
    quantize, checkpointing, offload, notes = resolve_memory_settings(config, 80 * GIB, "cuda")
    assert (quantize, checkpointing, offload) == ("none", False, 0) and "auto" in notes[0]
    # 32 GiB: bf16 fits only with checkpointing, which auto prefers to a quantized base
    assert resolve_memory_settings(config, 32 * GIB, "cuda")[:2] == ("none", True)


def test_auto_on_a_cpu_is_none_without_checkpointing():
    assert resolve_memory_settings(dev_config(), None, "cpu")[:3] == ("none", False, 0)


def test_explicit_values_pass_through():
    config = dev_config(model={"path": None, "quantize": "nf4"}, train={"gradient_checkpointing": False})
    assert resolve_memory_settings(config, 80 * GIB, "cuda")[:2] == ("nf4", False)


def test_does_not_fit_names_the_settings_in_order():
    config = dev_config(network={"linear": 64}, train={"batch_size": 2, "offload_blocks": 0},
                        model={"path": None, "quantize": "none"})
    with pytest.raises(DoesNotFit) as raised:
        resolve_memory_settings(config, 16 * GIB, "cuda")
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and "does not fit" in message
    order = [message.index(s, message.index("To fit")) for s in (
        "train.gradient_checkpointing true", "model.quantize fp8", "train.offload_blocks")]
    assert order == sorted(order) and "To fit" in message and "dataset.resolution" not in message
    assert "model.quantize int8" not in message  # one byte, as fp8: it saves nothing more
    with pytest.raises(DoesNotFit, match="more memory is needed"):
        resolve_memory_settings(dev_config(), 2 * GIB, "cuda")


def test_before_a_run_and_after_an_out_of_memory_the_same_list_in_the_same_order():
    """core/memory/lower.py's one list: what DoesNotFit applies until the estimate fits is the
    start of what the out-of-memory advice names, in the same order."""
    from loralab.core.memory import leaner_steps, out_of_memory_advice, suggestions

    config = dev_config(network={"linear": 64}, train={"batch_size": 2, "optimizer": "adamw",
                                                       "gradient_checkpointing": False},
                        model={"path": None, "quantize": "none", "dtype": "fp32"})
    blocks = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]  # 19 + 38
    everything = [change for change, _ in leaner_steps(config, flux.memory.quantize_modes, blocks=blocks)]
    assert everything[:4] == ["train.gradient_checkpointing true", "model.quantize fp8",
                              "train.offload_blocks 57", "model.quantize nf4"]
    assert everything[-3:] == ["network.linear 16", "network.linear 8", "network.linear 4"]
    advice = out_of_memory_advice(config, RuntimeError("CUDA out of memory."))
    assert [advice.index(f"set {change} (about") for change in everything] == sorted(
        advice.index(f"set {change} (about") for change in everything)
    applied, fit = suggestions(config, 12 * GIB)
    named = lambda changes: [change.rsplit(" ", 1)[0] for change in changes]  # noqa: E731
    # the same settings in the same order; the offloading step names the fewest blocks that fit
    assert fit and named(change for change, _ in applied) == named(everything[:len(applied)])
    assert len(applied) < len(everything)


def test_fit_report_marks_what_fits():
    report = fit_report(dev_config(), 24 * GIB)
    rows = {line.split()[0]: line for line in report.splitlines()[2:6]}
    assert "*" not in rows["none"] and "*" in rows["fp8"] and "*" in rows["nf4"]
    assert "auto picks: model.quantize fp8, gradient checkpointing on" in report


MEASURE = r"""
import json, sys, torch
from diffusers import FluxTransformer2DModel
from loralab.core.families.flux import LORA_TARGETS
from loralab.core.lora import add_lora

def rss(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))

results = []
for heads, layers, single, image, text, checkpointing in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=16, num_layers=layers, num_single_layers=single,
                                   num_attention_heads=heads, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=False)
    model.requires_grad_(False)
    add_lora(model, 4, 4, LORA_TARGETS)
    if checkpointing:
        model.enable_gradient_checkpointing()
    inputs = dict(hidden_states=torch.randn(1, image, 16), encoder_hidden_states=torch.randn(1, text, 64),
                  pooled_projections=torch.randn(1, 32), timestep=torch.full((1,), 0.5),
                  img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3))
    peaks = []
    for _ in range(2):  # the first step also allocates once-only buffers: the second is the step
        before = rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM, the peak resident size
        model(**inputs, return_dict=False)[0].pow(2).mean().backward()
        peaks.append(rss("VmHWM") - before)
        model.zero_grad(set_to_none=True)
    results.append(min(peaks))
print(json.dumps(results))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_activation_estimate_matches_a_cpu_measurement():
    """Peak RSS growth over one float32 forward + backward of small FLUX-shaped transformers
    (glibc returns each freed tensor to the OS: MALLOC_MMAP_THRESHOLD_), checkpointing off and
    on, against activation_bytes. Tolerance 15%: the calibration shapes were within 3%. Hidden
    widths of 512 and more: at 256 terms that do not grow with the width (RoPE tables, the
    embedders' inputs) add about a third, and FLUX's is 3072."""
    cases = [(4, 1, 2, 576, 256, False), (4, 1, 2, 576, 256, True), (6, 2, 1, 256, 256, False)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    for (heads, layers, single, image, text, checkpointing), peak in zip(cases, measured):
        shape = {"num_layers": layers, "num_single_layers": single, "hidden": heads * 128,
                 "guidance": False}
        estimate = activation_bytes(shape, int(image ** 0.5) * 16, 1, checkpointing, "fp32", "fp32")
        assert estimate == pytest.approx(peak, rel=0.15), (heads, layers, single, checkpointing)
