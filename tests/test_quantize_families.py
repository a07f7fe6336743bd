"""model.quantize fp8, int8 and nf4 for Z-Image, Qwen-Image and FLUX.2 klein, as for FLUX.1:

- every block linear that the family's memory model counts as quantizable is stored in that
  format (bitsandbytes quantizes on the CPU here; CUDA is where it is meant to run), and each
  stored layer computes what the full-precision layer of the same name does, within that
  format's error (a weight that landed in another layer would be far off);
- a run on an int8 base trains the same LoRA keys as on the full one, with near the same losses.
nf4 training is CUDA only (core/trainer/precision.py refuses it on a CPU, tested there)."""
import os

import pytest
import torch
from safetensors import safe_open

from comfyui_env import comfyui_source
from loralab.core.config import resolve
from loralab.core.families import get_family, load_model
from loralab.core.families.builtin import resolve_model_path
from loralab.core.families.parts.fp8 import Float8Linear
from loralab.core.trainer import train

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = {"zimage": "builtin:tiny-zimage", "qwen_image": "builtin:tiny-qwen-image", "flux2": "builtin:tiny-flux2"}
LAYERS = {"fp8": Float8Linear, "int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
# the largest relative error of a layer's output (|quantized - full| / |full|, whole tensor): fp8
# e4m3 keeps 3 mantissa bits, int8 rows of 127 steps, nf4 16 levels per block of 64; another
# layer's weight would be off by about 1.4
ERROR = {"fp8": 0.08, "int8": 0.03, "nf4": 0.2}  # measured: at most 0.04, 0.008, 0.13


@pytest.fixture
def section(request, monkeypatch):
    family = request.param
    if family == "qwen_image":  # the tiny Qwen-Image is built with Qwen2.5's tokenizer from ComfyUI's source
        if not os.path.isdir(os.path.join(comfyui_source(), "comfy", "text_encoders", "qwen25_tokenizer")):
            pytest.skip("no ComfyUI source (set LORALAB_COMFYUI): the tiny Qwen-Image needs its Qwen2.5 tokenizer")
        monkeypatch.setenv("LORALAB_COMFYUI", comfyui_source())
    return {"family": family, "path": resolve_model_path(BUILTIN[family]), "dtype": "bf16"}


@pytest.mark.parametrize("section", list(BUILTIN), indirect=True)
def test_each_mode_stores_the_linears_the_memory_model_counts_and_computes_as_the_full_ones(section):
    family = get_family(section["family"])
    shape, _ = family.memory.shape({**section, "transformer_path": None})
    full = dict(load_model(section, "none").transformer.named_modules())
    x = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))  # widened to each layer below
    for mode, kind in LAYERS.items():
        quantized = {name: m for name, m in load_model(section, mode).transformer.named_modules()
                     if isinstance(m, kind)}
        assert sum(m.in_features * m.out_features for m in quantized.values()) == shape["quantizable"] > 0, mode
        for name, layer in quantized.items():
            if mode == "nf4" and layer.in_features < 64:
                # bitsandbytes' CPU nf4 kernel packs rows of 64 or more inputs (real layers have
                # thousands): the stored weight, dequantized, is compared instead
                want = full[name].weight.float()
                got = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            else:
                inputs = (x.expand(4, layer.in_features) * torch.linspace(-1, 1, layer.in_features)).to(torch.bfloat16)
                with torch.no_grad():
                    want, got = full[name](inputs).float(), layer(inputs).float()
            error = ((got - want).norm() / want.norm()).item()
            assert error < ERROR[mode], (mode, name, error)


def run(section, quantize, data, output):
    config = resolve({
        "name": f"q_{quantize}", "model": {**section, "path": BUILTIN[section["family"]], "quantize": quantize},
        "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
        "network": {"linear": 4},
        "train": {"steps": 4, "lr": 1e-3, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True},
        "save": {"save_every": 1000, "output_dir": str(output)}, "sample": {"sample_every": 0},
        "logging": {"performance_log_every": 1}})
    losses = []
    result = train(config, on_event=lambda event: losses.append(event["loss"]) if event.get("type") == "step" else None)
    with safe_open(result.lora_path, "pt") as f:
        return losses, sorted(f.keys())


@pytest.mark.parametrize("section", ["zimage"], indirect=True)
def test_an_int8_base_trains_the_same_lora_with_near_the_same_losses(section, dataset, tmp_path):
    full_losses, full_keys = run(section, "none", dataset, tmp_path)
    int8_losses, int8_keys = run(section, "int8", dataset, tmp_path)
    assert int8_keys == full_keys and full_keys
    assert len(int8_losses) == len(full_losses) == 4
    assert int8_losses == pytest.approx(full_losses, rel=0.02), (int8_losses, full_losses)
    assert int8_losses != full_losses  # ... from another base: the int8 one
