"""Qwen-Image trains and its LoRA file loads everywhere, checked against diffusers' own pipeline
and ComfyUI's own LoRA loader, on a tiny model this test builds from diffusers' and
transformers' classes directly (not with LoRA Lab's tiny builder)."""
import json
import logging
import os
import re
import subprocess

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import COMFYUI_SOURCE, run_cli
from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def _tiny_pipeline(folder):
    """A random QwenImagePipeline: two blocks of width 32, a Qwen2.5-VL text encoder of width 32,
    the Qwen-Image VAE's structure at base width 8, the real Qwen2.5 tokenizer (ComfyUI's)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    tokenizer_folder = os.path.join(COMFYUI_SOURCE, "comfy", "text_encoders", "qwen25_tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_folder, "vocab.json")):
        pytest.skip(f"no ComfyUI source at {COMFYUI_SOURCE} (set LORALAB_COMFYUI): its Qwen2.5 tokenizer is needed")
    torch.manual_seed(1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]), tie_word_embeddings=True))
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                  base_image_seq_len=256, max_image_seq_len=8192,
                                                  shift_terminal=0.02, time_shift_type="exponential"),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        text_encoder=text_encoder, tokenizer=Qwen2Tokenizer.from_pretrained(tokenizer_folder),
        transformer=QwenImageTransformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                                joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return _tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-qwen-image"))


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    """`loralab train` (a subprocess) on three demo images at 64 px: (run output, dataset folder)."""
    from loralab.core.demo.dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("qwen-train")
    folder = make_demo_dataset(str(root / "data"), count=3)
    config = {"name": "qwen", "model": {"path": tiny_qwen, "dtype": "fp32"},
              "dataset": {"folder": folder, "trigger_word": "sks", "resolution": [SIZE],
                          "caption_dropout_rate": 0.0},
              "network": {"linear": 4, "linear_alpha": 8},  # alpha != rank: the file must carry the scale
              "train": {"steps": 120, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32",
                        "gradient_checkpointing": False},
              "save": {"save_every": 1000, "output_dir": str(root / "out")},
              "sample": {"sample_every": 0}}
    (root / "config.json").write_text(json.dumps(config))
    done = run_cli("train", str(root / "config.json"), timeout=900,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "LORALAB_COMFYUI": COMFYUI_SOURCE})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), folder


def _reference_inputs(pipeline, folder):
    """Latents, embeddings and mask of the training images and captions, made with diffusers'
    own pipeline parts as its training script does (no LoRA Lab code)."""
    from PIL import Image

    images, captions = [], []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            image = Image.open(os.path.join(folder, name)).convert("RGB").resize((SIZE, SIZE))
            images.append(torch.from_numpy(numpy.asarray(image, dtype=numpy.float32)))
            with open(os.path.join(folder, name[:-4] + ".txt")) as f:
                captions.append(f.read().strip())
    pixels = (torch.stack(images) / 127.5 - 1).permute(0, 3, 1, 2)[:, :, None]
    config = pipeline.vae.config
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        latents = (latents - mean) * (1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1))
        embeds, mask = pipeline.encode_prompt(captions, device="cpu")
    return latents, embeds, mask


def _loss(pipeline, latents, embeds, mask):
    """diffusers' training script's flow-matching loss at fixed noise and noise levels."""
    from diffusers import QwenImagePipeline

    generator = torch.Generator().manual_seed(7)
    batch, channels, _, height, width = latents.shape
    losses = []
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = (torch.rand(batch, generator=generator) * 0.9 + 0.05).view(-1, 1, 1, 1, 1)
            noisy = (1 - sigmas) * latents + sigmas * noise
            packed = QwenImagePipeline._pack_latents(noisy.permute(0, 2, 1, 3, 4), batch, channels, height, width)
            prediction = pipeline.transformer(hidden_states=packed, encoder_hidden_states=embeds,
                                              encoder_hidden_states_mask=mask, timestep=sigmas.flatten(),
                                              img_shapes=[(1, height // 2, width // 2)] * batch,
                                              return_dict=False)[0]
            prediction = QwenImagePipeline._unpack_latents(prediction, height * 8, width * 8, 8)
            losses.append(torch.nn.functional.mse_loss(prediction, noise - latents).item())
    return sum(losses) / len(losses)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lora_learns_and_loads_whole_in_diffusers(trained, tiny_qwen):
    from diffusers import QwenImagePipeline

    result, folder = trained
    weights = load_file(result["lora"])
    assert weights and all(re.match(r"transformer\.transformer_blocks\.\d+\..*\.lora_[AB]\.weight$", k)
                           for k in weights), sorted(weights)[:4]
    pipeline = QwenImagePipeline.from_pretrained(tiny_qwen, local_files_only=True)
    latents, embeds, mask = _reference_inputs(pipeline, folder)
    base = _loss(pipeline, latents, embeds, mask)

    caught = Warnings()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(caught)
    try:
        pipeline.load_lora_weights(result["lora"], adapter_name="trained")
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(caught)
    assert not [m for m in caught.messages if "unexpected" in m.lower() or "missing" in m.lower()], caught.messages
    modules = {n for n, m in pipeline.transformer.named_modules() if hasattr(m, "lora_A") and "trained" in m.lora_A}
    assert {f"transformer.{n}.lora_A.weight" for n in modules} == {k for k in weights if ".lora_A." in k}
    learned = _loss(pipeline, latents, embeds, mask)
    print(f"flow-matching loss of the training images: base {base:.4f}, with the LoRA {learned:.4f}")
    assert learned <= 0.85 * base, (base, learned)


COMFYUI_SCRIPT = COMFYUI_HEAD + r'''
lora_paths, config = job

# ComfyUI's Qwen-Image at the tiny widths its detection does not read (it reads in_channels and
# the block count, and assumes 24 heads of 128 and a 3584-wide text)
transformer = load_file(config.pop("transformer"))
unet_config = comfy.model_detection.detect_unet_config(transformer, "")
assert unet_config["image_model"] == "qwen_image", unet_config
unet_config.update(config)
model = comfy.supported_models.QwenImage(unet_config).get_model({})
missing, unexpected = model.diffusion_model.load_state_dict(transformer, strict=False)
key_map = comfy.lora.model_lora_keys_unet(model, {})
weights = model.diffusion_model.state_dict()
reports = []
for lora_path in lora_paths:
    warnings.clear()
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(lora_path)), key_map)
    deltas = {}
    for target, patch in patches.items():
        name = target[len("diffusion_model."):]
        base = weights[name].float()
        deltas[name] = (comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), target) - base).contiguous()
    save_file(deltas, lora_path + ".comfyui-deltas.safetensors")
    reports.append({"not_loaded": [w for w in warnings if "not loaded" in w], "patched": len(patches),
                    "missing": list(missing), "unexpected": list(unexpected)})
print(json.dumps(reports))
'''


def _comfyui_deltas(lora_paths, transformer_path, transformer_config, tmp_path):
    """[(report, deltas)] of each LoRA file in ComfyUI's own loader, one ComfyUI process for all."""
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    config = {"transformer": transformer_path, "num_attention_heads": transformer_config["num_attention_heads"],
              "attention_head_dim": transformer_config["attention_head_dim"],
              "joint_attention_dim": transformer_config["joint_attention_dim"],
              "axes_dims_rope": list(transformer_config["axes_dims_rope"])}
    (tmp_path / "job.json").write_text(json.dumps([lora_paths, config]))
    done = subprocess.run([python, "-c", COMFYUI_SCRIPT, str(tmp_path / "job.json")], cwd=comfyui,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    return [(report, load_file(path + ".comfyui-deltas.safetensors")) for report, path in zip(reports, lora_paths)]


def test_comfyui_uses_every_key_with_peft_deltas(trained, tiny_qwen, tmp_path):
    """ComfyUI's own LoRA loader, on ComfyUI's Qwen-Image model holding the tiny transformer: every
    key of the file lands, and each weight moves by exactly what peft's layer adds in diffusers."""
    from diffusers import QwenImageTransformer2DModel

    from loralab.core.families import get_family

    result, _ = trained
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen, subfolder="transformer")
    transformer_path = str(tmp_path / "transformer.safetensors")
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, transformer_path)
    # save.format kohya (musubi-tuner's lora_unet_ names, .alpha = rank) beside the default file
    peft = {k[len("transformer."):]: v for k, v in load_file(result["lora"]).items()}
    kohya_path = str(tmp_path / "kohya.safetensors")
    save_file(get_family("qwen_image").lora_to_kohya(None)(peft), kohya_path)
    loaded = _comfyui_deltas([result["lora"], kohya_path], transformer_path, dict(transformer.config), tmp_path)

    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline.from_pretrained(tiny_qwen, local_files_only=True)
    pipeline.load_lora_weights(result["lora"], adapter_name="trained")
    expected = {name + ".weight": module.get_delta_weight("trained").float()
                for name, module in pipeline.transformer.named_modules()
                if hasattr(module, "lora_A") and "trained" in module.lora_A}
    modules = sum(k.endswith(".lora_A.weight") for k in load_file(result["lora"]))
    for report, deltas in loaded:
        assert report["missing"] == [] and report["unexpected"] == [], report
        assert report["not_loaded"] == [] and report["patched"] == modules, report
        assert sorted(deltas) == sorted(expected)
        for key, delta in expected.items():
            torch.testing.assert_close(deltas[key], delta, rtol=1e-3, atol=1e-6, msg=key)


def test_defaults_apply_only_where_the_config_is_silent(tmp_path):
    from loralab.core.config import resolve

    base = {"model": {"family": "qwen_image", "path": str(tmp_path)}, "dataset": {"folder": str(tmp_path)}}
    config = resolve(base)
    assert (config["train"]["timestep_type"], config["sample"]["guidance_scale"],
            config["sample"]["sample_steps"], config["save"]["format"]) == ("shift", 4.0, 25, "diffusers")
    given = resolve({**base, "train": {"timestep_type": "sigmoid"}, "sample": {"guidance_scale": 1.0}})
    assert (given["train"]["timestep_type"], given["sample"]["guidance_scale"]) == ("sigmoid", 1.0)


def test_noise_levels_shift_towards_noise():
    from loralab.core.families.qwen_image import sample_sigmas

    draws = {kind: sample_sigmas(20000, kind, 4096, torch.Generator().manual_seed(0)).mean().item()
             for kind in ("sigmoid", "shift", "flux_shift")}
    # shift 2.2 and the scheduler's own shift at 4096 tokens (mu 0.69: k = 2.0) move the mean up
    assert 0.49 < draws["sigmoid"] < 0.51 and draws["shift"] > 0.6 and draws["flux_shift"] > 0.58, draws


def test_builtin_tiny_qwen_image_loads(tmp_path, monkeypatch):
    from loralab.core.families import folder_family, load_model

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    monkeypatch.setenv("LORALAB_COMFYUI", COMFYUI_SOURCE)
    assert folder_family("builtin:tiny-qwen-image") == "qwen_image"
    pipeline = load_model({"family": "qwen_image", "path": "builtin:tiny-qwen-image", "dtype": "fp32"}, "none")
    assert type(pipeline).__name__ == "QwenImagePipeline" and pipeline.transformer.config.num_layers == 2


def test_memory_estimate_near_musubi_tuners_figures():
    """musubi-tuner (docs/qwen_image.md, 1024 px, batch 1, bf16, gradient checkpointing): 42 GB
    unquantized, 30 GB with fp8, which keeps the modulation linears (6.8 B weights) in bf16."""
    from loralab.core.config import with_defaults
    from loralab.core.memory.estimate import peak_breakdown

    config = with_defaults({"model": {"family": "qwen_image", "path": None, "dtype": "bf16"},
                            "dataset": {"folder": "-", "resolution": [1024]},
                            "train": {"optimizer": "adamw8bit"}})
    none = peak_breakdown(config, "none", True, 1024).total / 2**30
    fp8 = peak_breakdown(config, "fp8", True, 1024).total / 2**30
    assert 38 < none < 46 and 20 < fp8 < 28 and none - fp8 > 17, (none, fp8)


def test_the_shipped_config_takes_comfyuis_three_files():
    """configs/qwen-image.json: the three ComfyUI files, Qwen-Image's defaults for what it leaves out."""
    from loralab.core.config import resolve

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with open(os.path.join(folder, "qwen-image.json")) as f:
        config = resolve(json.load(f))
    assert config["model"]["text_encoder_path"].endswith("qwen_2.5_vl_7b_fp8_scaled.safetensors")
    assert (config["train"]["timestep_type"], config["sample"]["guidance_scale"]) == ("shift", 4.0)
