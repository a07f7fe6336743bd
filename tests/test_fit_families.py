"""The measured memory models of Z-Image and FLUX.2 klein: their shapes against diffusers' own
classes at the model cards' sizes (meta device), the LoRA size against peft's, the activations
against a peak measured on the CPU (benchmarks/activation_memory.py at a small width), and the
estimates beside the peers' published figures (the quantize modes load as they count:
test_quantize_families.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from loralab.core.config import with_defaults
from loralab.core.families import get_family
from loralab.core.memory.estimate import peak_breakdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def linear_weights(model, prefixes):
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith(prefixes))


def meta(build):
    with torch.device("meta"):
        return build()


def test_z_image_shape_is_diffusers_model_at_its_real_size():
    from diffusers import ZImageTransformer2DModel

    from loralab.core.families.zimage import BLOCK_PREFIXES

    model = meta(ZImageTransformer2DModel)  # Tongyi-MAI/Z-Image's sizes are its defaults
    memory = get_family("zimage").memory
    shape, source = memory.shape({"path": None})
    assert shape["hidden"] == 3840 and shape["num_layers"] == 30 and shape["refiner_layers"] == 2
    assert shape["parameters"] == sum(p.numel() for p in model.parameters())
    assert shape["quantizable"] == linear_weights(model, BLOCK_PREFIXES) == sum(memory.block_parameters(shape))
    assert len(memory.block_parameters(shape)) == 34 and "no local model" in source


@pytest.mark.parametrize("size, blocks, width", [("4B", (5, 20), 3072), ("9B", (8, 24), 4096)])
def test_flux2_klein_shapes_are_diffusers_model_at_the_cards_sizes(size, blocks, width):
    from diffusers import Flux2Transformer2DModel

    from loralab.core.families.flux2.memory import KLEIN, reference, shape_of

    model = meta(lambda: Flux2Transformer2DModel(**KLEIN[size], guidance_embeds=False))
    shape = shape_of(*reference(size))
    memory = get_family("flux2").memory
    assert (shape["num_layers"], shape["num_single_layers"], shape["hidden"]) == (*blocks, width)
    assert shape["parameters"] == sum(p.numel() for p in model.parameters())
    weights = linear_weights(model, ("transformer_blocks.", "single_transformer_blocks."))
    assert shape["quantizable"] == weights == sum(memory.block_parameters(shape))
    # no local folder: the size model.path names (the hub's name), 4B otherwise
    named = memory.shape({"path": f"black-forest-labs/FLUX.2-klein-base-{size}"})
    assert named[0] == shape and size in named[1]


SMALL = {"zimage": lambda: __import__("diffusers").ZImageTransformer2DModel(
              dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
              axes_dims=[32, 48, 48]),
         "flux2": lambda: __import__("diffusers").Flux2Transformer2DModel(
              in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=128, num_attention_heads=2,
              joint_attention_dim=32, guidance_embeds=False)}


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_lora_parameters_are_what_peft_adds(family):
    """At a small width: peft's own count of the trainable parameters LORA_TARGETS adds."""
    from loralab.core.lora import add_lora

    model = SMALL[family]().requires_grad_(False)
    memory = get_family(family).memory
    shape = memory.shape_of(dict(model.config), sum(p.numel() for p in model.parameters()))
    add_lora(model, 4, 4, get_family(family).LORA_TARGETS)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    network = with_defaults({"network": {"linear": 4, "linear_alpha": 4}})["network"]
    assert memory.lora_parameters(shape, network) == trained > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_activation_estimate_matches_a_cpu_measurement_at_a_fresh_width():
    """Peak RSS growth of one forward + backward (benchmarks/activation_memory.py, the harness
    the constants were calibrated with at the real width) at width 1024, float32 and bf16,
    checkpointing off and on. Tolerance 10%: the calibration rows were within 2%."""
    cases = [[1, 1, 256, 64, False, False], [2, 1, 256, 64, True, False], [2, 1, 256, 64, False, True]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "activation_memory.py"), "zimage",
                             "flux2", "--width", "1024", "--cases", json.dumps(cases)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    measured = iter(json.loads(lines[-1]))
    shapes = {"zimage": {"refiner_layers": 1, "hidden": 1024, "mlp": 2730, "text_tokens": 64},
              "flux2": {"num_single_layers": 1, "hidden": 1024, "mlp": 3072, "text_tokens": 64}}
    for family, shape in shapes.items():
        memory = get_family(family).memory
        for (layers, _, image, _, checkpointing, mixed), peak in zip(cases, measured):
            precision = "bf16" if mixed else "fp32"
            estimate = memory.activation_bytes({**shape, "num_layers": layers}, 256, 1, checkpointing,
                                               precision, precision)
            assert estimate == pytest.approx(peak, rel=0.10), (family, layers, checkpointing, mixed, lines)


def test_estimates_beside_the_peers_published_figures():
    """1024 px, rank 16, batch 1, gradient checkpointing: Z-Image about 10 GB in int8 on
    SimpleTuner (ours in fp8, the same one byte per weight); Qwen-Image 42 GB bf16 and 30 GB fp8
    on musubi-tuner (ours stores its modulation linears in fp8 too: 6.3 GiB less, docs/qwen-image.md)."""
    def peak(family, quantize):
        config = with_defaults({"model": {"family": family, "path": None},
                                "dataset": {"folder": "-", "resolution": [1024]},
                                "train": {"optimizer": "adamw8bit"}})
        return peak_breakdown(config, quantize, True, 1024).total / GIB

    assert 8 < peak("zimage", "fp8") < 12
    assert 38 < peak("qwen_image", "none") < 46 and 20 < peak("qwen_image", "fp8") < 28
    assert peak("flux2", "fp8") < peak("flux2", "none") < 16  # klein 4B: a 16 GB card in bf16
