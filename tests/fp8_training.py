"""A short training run with `model.quantize: fp8` (the families whose loaders store the blocks'
linears as core/families/parts/fp8.py's Float8Linear) beside the same run unquantized, on the CPU.

What is compared, and why these bounds: AdamW's first steps move each weight by about lr times the
sign of its gradient, and lora_B starts at zero, so after a few steps lora_B is the sign pattern of
its gradients. fp8 (e4m3, 3 mantissa bits: each block weight within 1/16 of itself) perturbs the
gradients by a few percent, which flips only the signs of the near-zero ones: the fp8 run's lora_B
points the way the unquantized one does (cosine >= 0.9, i.e. at most ~5% of its values flipped;
measured 0.964 on Z-Image's tiny model, 0.987 on klein's), yet is not the same (the blocks were quantized: fp32 runs on the CPU repeat exactly). A wrong fp8
path trains from another model and points elsewhere (the scale lost in dequantizing: cosine 0.04
and 0.01), or is no fp8 path (the loader not quantizing: the same LoRA exactly)."""
import torch
from safetensors.torch import load_file

from loralab.core.config import resolve
from loralab.core.trainer import train

STEPS, LR, MIN_COSINE = 2, 1e-3, 0.9


def short_run(folder, data, output_dir, quantize):
    config = resolve({
        "name": f"fp8-check-{quantize}", "model": {"path": folder, "dtype": "fp32", "quantize": quantize},
        "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
        "network": {"linear": 4},
        "train": {"steps": STEPS, "lr": LR, "optimizer": "adamw", "dtype": "fp32", "gradient_checkpointing": False},
        "save": {"output_dir": str(output_dir), "dtype": "float32", "save_every": 1000},
        "sample": {"sample_every": 0}})
    result = train(config)
    assert (result.status, result.step) == ("finished", STEPS), result
    assert result.config["model"]["quantize"] == quantize
    return load_file(result.lora_path)


def assert_fp8_trains_as_unquantized(folder, data, output_dir):
    """Both runs finish; the fp8 LoRA has the unquantized one's keys and shapes, finite values, and
    its lora_B within MIN_COSINE of the unquantized one's (but not equal)."""
    plain, quantized = (short_run(folder, data, output_dir, q) for q in ("none", "fp8"))
    assert sorted(quantized) == sorted(plain)
    assert all(quantized[k].shape == plain[k].shape for k in plain)
    assert all(torch.isfinite(v).all() for v in quantized.values())
    trained = sorted(k for k in plain if ".lora_B." in k)
    want, got = (torch.cat([lora[k].flatten() for k in trained]) for lora in (plain, quantized))
    cosine = torch.nn.functional.cosine_similarity(want, got, dim=0).item()
    assert not torch.equal(want, got), "the fp8 run trained exactly as the unquantized one: nothing was quantized"
    assert cosine >= MIN_COSINE, cosine
    return cosine
