"""Z-Image: `loralab train` (a subprocess, as a user runs it) on a tiny Z-Image that this test
builds from diffusers' and transformers' own classes (not with our builder), with the real Qwen
tokenizer from ComfyUI's source. Checked against independent references:

- the flow-matching loss of the training images, computed here as diffusers'
  train_dreambooth_lora_z_image.py computes it with ZImagePipeline's own parts (encode_prompt, the
  VAE's mode, t = 1 - sigma, the negated prediction) after `load_lora_weights`, falls by >= 15%;
- diffusers loads the file with every key taken, as it was saved;
- ComfyUI's own LoRA loader (comfy.lora with its Z-Image key map, in ComfyUI's Python) uses every
  key, and its weight deltas, q/k/v as slices of ComfyUI's fused qkv, equal diffusers' fused ones.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.core.demo.dataset import make_demo_dataset

from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source
from conftest import qwen3_tokenizer, tiny_qwen3, train_cli
from fp8_training import assert_fp8_trains_as_unquantized

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HEADS, AXES, LAYERS, TEXT_DIM, LATENT = 96, 3, [8, 12, 12], 2, 32, 16


def build_zimage(folder):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen3_tokenizer()
    torch.manual_seed(0)
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(latent_channels=LATENT, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                          shift_factor=0.1159),
        text_encoder=tiny_qwen3(Qwen3Model, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                                head_dim=16),
        tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(in_channels=LATENT, dim=DIM, n_layers=LAYERS, n_refiner_layers=2,
                                             n_heads=HEADS, n_kv_heads=HEADS, cap_feat_dim=TEXT_DIM, axes_dims=AXES,
                                             axes_lens=[512, 64, 64]))
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the tiny model's folder, three drawn training images): built once for this file."""
    root = tmp_path_factory.mktemp("zimage")
    return build_zimage(str(root / "model")), make_demo_dataset(str(root / "data"), count=3)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage-trained")
    folder, data = model
    config = {"name": "z", "model": {"path": folder, "dtype": "fp32"},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
              "network": {"linear": 4},
              "train": {"steps": 120, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(root / "out"), "save_every": 1000}, "sample": {"sample_every": 0}}
    _, lora = train_cli(config, str(root))
    return folder, data, lora


def _pipeline(folder):
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference_loss(pipeline, latents, embeds):
    """train_dreambooth_lora_z_image.py's loss at fixed noise and noise levels."""
    generator = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = (torch.rand(latents.shape[0], generator=generator) * 0.9 + 0.05).view(-1, 1, 1, 1)
            noisy = (1.0 - sigmas) * latents + sigmas * noise
            out = pipeline.transformer(list(noisy.unsqueeze(2).unbind(0)), 1 - sigmas.flatten(), embeds,
                                       return_dict=False)[0]
            prediction = -torch.stack(out).squeeze(2)
            losses.append(torch.nn.functional.mse_loss(prediction, noise - latents).item())
    return sum(losses) / len(losses)


def training_images(pipeline, data):
    from PIL import Image

    names = sorted(n for n in os.listdir(data) if n.endswith(".png"))
    captions = [open(os.path.join(data, n[:-4] + ".txt")).read().strip() for n in names]
    pixels = pipeline.image_processor.preprocess([Image.open(os.path.join(data, n)).convert("RGB").resize((64, 64))
                                                  for n in names])
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
        embeds, _ = pipeline.encode_prompt(list(captions), do_classifier_free_guidance=False)  # it templates in place
    config = pipeline.vae.config
    return (latents - config.shift_factor) * config.scaling_factor, embeds, captions


def test_training_lowers_diffusers_own_loss_on_the_training_images(trained):
    folder, data, lora = trained
    pipeline = _pipeline(folder)
    latents, embeds, _ = training_images(pipeline, data)
    base = reference_loss(pipeline, latents, embeds)
    pipeline.load_lora_weights(lora, adapter_name="trained")
    by_strength = {}
    for strength in (1.0, 0.5, -1.0):
        pipeline.set_adapters(["trained"], adapter_weights=[strength])
        by_strength[strength] = reference_loss(pipeline, latents, embeds)
    assert by_strength[1.0] <= 0.85 * base, (base, by_strength)
    assert by_strength[1.0] < by_strength[0.5] < base < by_strength[-1.0], (base, by_strength)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(trained):
    from loralab.core.families.zimage import FAMILY as zimage

    folder, data, _ = trained
    pipeline = _pipeline(folder)
    _, embeds, captions = training_images(pipeline, data)
    ours = zimage.encode_prompts(pipeline, captions + [""], "cpu")
    for caption, reference in zip(captions, embeds):
        text, mask = ours[caption]
        assert torch.allclose(text[mask > 0], reference, atol=1e-5)
    empty, _ = pipeline.encode_prompt("", do_classifier_free_guidance=False)
    assert torch.allclose(ours[""][0][ours[""][1] > 0], empty[0], atol=1e-5)


def test_file_loads_whole_in_diffusers(trained):
    from peft.utils import get_peft_model_state_dict

    folder, _, lora = trained
    pipeline = _pipeline(folder)
    pipeline.load_lora_weights(lora, adapter_name="trained")
    file = load_file(lora)
    assert file and all(k.startswith("transformer.") and ".lora_" in k for k in file)
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name="trained")
    assert set(loaded) == {k[len("transformer."):] for k in file}
    assert all(torch.equal(loaded[k[len("transformer."):]].to(v.dtype), v) for k, v in file.items())
    modules = {k.split(".lora_")[0] for k in loaded}  # attention q/k/v/out and feed-forward of every block
    assert len(modules) == 7 * (LAYERS + 2 + 2), sorted(modules)


COMFYUI_SCRIPT = COMFYUI_HEAD + r'''
config = job["config"]

# ComfyUI's Z-Image (NextDiT as model_detection configures it at dim 3840), at the tiny sizes
unet_config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "qk_norm": True,
               "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
               "time_scale": 1000.0, "pad_tokens_multiple": 32, **config}
model = comfy.supported_models.ZImage(unet_config).get_model({})
key_map = comfy.lora.model_lora_keys_unet(model, {})
weights = model.state_dict()
# back to diffusers' names by ComfyUI's own map: q, k and v are slices of its fused qkv
to_comfy = comfy.utils.z_image_to_diffusers(unet_config, output_prefix="diffusion_model.")
loras = {}
for name, (lora_path, out_path) in job["loras"].items():
    warnings.clear()
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(lora_path)), key_map)
    deltas = {}
    for target, patch in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        base = deltas.get(key, torch.zeros_like(weights[key], dtype=torch.float32))
        deltas[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, offset, None)], base, key)
    named = {}
    for diffusers_name, to in to_comfy.items():
        key, piece = to if isinstance(to, tuple) else (to, None)
        if key in deltas:
            named[diffusers_name] = deltas[key] if piece is None else deltas[key].narrow(*piece)
    save_file({k: v.contiguous() for k, v in named.items()}, out_path)
    loras[name] = {"warnings": list(warnings), "targets": len(patches), "comfy_keys": sorted(deltas)}

# ComfyUI's detection of our layout at the real width (shapes only)
shapes = json.load(open(job["shapes"]))
transformer = {k: torch.empty(s, device="meta") for k, s in shapes["transformer"].items()}
detected = comfy.model_detection.detect_unet_config(transformer, "")
found = comfy.model_detection.model_config_from_unet_config(detected, transformer)
text_encoder = {k: torch.empty(s, device="meta") for k, s in shapes["text_encoder"].items()}
print(json.dumps({"loras": loras, "detected": {"model": type(found).__name__, "n_layers": detected.get("n_layers"),
                               "text_encoder": comfy.sd.detect_te_model(text_encoder).name}}))
'''


def real_width_shapes():
    """Our layout of a real-width transformer (2 layers) and Qwen3-4B (1 layer), shapes only."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from loralab.core.families.zimage.tiny import to_comfyui_layout

    with init_empty_weights():
        transformer = ZImageTransformer2DModel(n_layers=2)
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                              num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                                              head_dim=128))
    return {"transformer": {k: list(v.shape) for k, v in to_comfyui_layout(transformer.state_dict()).items()},
            "text_encoder": {"model." + k: list(v.shape) for k, v in text_encoder.state_dict().items()}}


@pytest.fixture(scope="module")
def comfyui_report(trained, tmp_path_factory):
    """What ComfyUI's own code makes of the trained file and of our real-width layout: one
    subprocess in ComfyUI's Python (importing ComfyUI takes most of its time)."""
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    root = tmp_path_factory.mktemp("comfyui")
    (root / "shapes.json").write_text(json.dumps(real_width_shapes()))
    config = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": HEADS, "cap_feat_dim": TEXT_DIM,
              "axes_dims": AXES, "axes_lens": [512, 64, 64]}
    from loralab.core.families.zimage import FAMILY

    diffusers_file = load_file(trained[2])  # the trained file again, in the kohya layout
    kohya = FAMILY.lora_to_kohya(None)({k[len("transformer."):]: v for k, v in diffusers_file.items()})
    save_file(kohya, str(root / "kohya.safetensors"))
    loras = {"diffusers": trained[2], "kohya": str(root / "kohya.safetensors")}
    job = {"config": config, "shapes": str(root / "shapes.json"),
           "loras": {name: (path, str(root / f"{name}.deltas.safetensors")) for name, path in loras.items()}}
    (root / "job.json").write_text(json.dumps(job))
    result = subprocess.run([python, "-c", COMFYUI_SCRIPT, str(root / "job.json")], cwd=comfyui,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, {name: (path, load_file(job["loras"][name][1])) for name, path in loras.items()}


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_comfyui_uses_every_key_with_diffusers_deltas(trained, comfyui_report, layout):
    """The file in either layout, by ComfyUI and by diffusers: every key used, the same deltas."""
    report, files = comfyui_report
    lora, comfy = files[layout]
    used = report["loras"][layout]
    assert not [w for w in used["warnings"] if "not loaded" in w or "lora" in w.lower()], used["warnings"]
    assert used["targets"] == sum(1 for k in load_file(lora) if ".lora_A." in k or ".lora_down." in k)
    assert any(k.endswith("attention.qkv.weight") for k in used["comfy_keys"])

    # diffusers' deltas: the weights after fuse_lora less before
    pipeline = _pipeline(trained[0])
    before = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    pipeline.load_lora_weights(lora)
    pipeline.fuse_lora(lora_scale=1.0)
    after = {k.replace(".base_layer", ""): v for k, v in pipeline.transformer.state_dict().items()}
    expected = {k: after[k] - v for k, v in before.items() if not torch.equal(after[k], v)}
    assert len(expected) == used["targets"]  # diffusers took every module of the file
    changed = {k for k, v in comfy.items() if v.abs().max() > 0}
    assert changed == set(expected), (sorted(changed ^ set(expected)))
    for key in expected:
        assert torch.allclose(comfy[key], expected[key], rtol=1e-4, atol=1e-6), key


# -- ComfyUI's single files ------------------------------------------------------------------------

def _files_model(paths, transformer="transformer"):
    return {"path": None, "family": "zimage", "dtype": "fp32", "transformer_path": paths[transformer],
            "text_encoder_path": paths["text_encoder"], "vae_path": paths["vae"]}


@pytest.fixture(scope="module")
def comfyui_files(trained):
    from loralab.core.families.zimage.tiny import write_comfyui_files

    return write_comfyui_files(trained[0])


def test_comfyui_files_load_as_the_folder(trained, comfyui_files):
    from loralab.core.families import detect_family
    from loralab.core.families.zimage import FAMILY as zimage

    folder = _pipeline(trained[0])
    assert detect_family({"path": None, "transformer_path": comfyui_files["transformer"]}) == "zimage"
    for transformer, tolerance in (("transformer", 2 ** -8), ("transformer_fp8", 2 ** -3)):
        loaded = zimage.load(_files_model(comfyui_files, transformer), "none", comfyui_source())
        for part in ("transformer", "text_encoder", "vae"):
            want, got = getattr(folder, part).state_dict(), getattr(loaded, part).state_dict()
            assert set(want) == set(got), (part, sorted(set(want) ^ set(got))[:4])
            for key, value in want.items():  # bf16 rounding (fp8: its 3 mantissa bits) of each tensor
                scale = value.abs().max().clamp(min=1e-12)
                assert (got[key].float() - value).abs().max() <= tolerance * scale, (transformer, part, key)
    captions = ["a photo of sks", ""]
    ours, theirs = zimage.encode_prompts(loaded, captions, "cpu"), zimage.encode_prompts(folder, captions, "cpu")
    assert all(torch.equal(ours[c][1], theirs[c][1]) for c in captions)  # the same tokens


def test_a_file_of_another_kind_is_refused_naming_the_setting(comfyui_files):
    from loralab.core.families.zimage import FAMILY as zimage
    from loralab.core.families.base import ModelError

    swapped = {**_files_model(comfyui_files), "text_encoder_path": comfyui_files["vae"]}
    with pytest.raises(ModelError, match=r"model\.text_encoder_path: .*ae\.safetensors looks like an autoencoder"):
        zimage.load(swapped, "none", comfyui_source())
    swapped = {**_files_model(comfyui_files), "transformer_path": comfyui_files["text_encoder"]}
    with pytest.raises(ModelError, match=r"model\.transformer_path: .* looks like a Qwen3 text encoder"):
        zimage.load(swapped, "none", comfyui_source())


def test_train_from_comfyui_files(comfyui_files, trained, tmp_path):
    from peft.utils import get_peft_model_state_dict

    folder, data, from_folder = trained
    turbo = tmp_path / "z_image_turbo_fp8_scaled.safetensors"  # named as ComfyUI's Turbo file is
    shutil.copy(comfyui_files["transformer_fp8"], turbo)
    config = {"name": "files", "model": {**{k: v for k, v in _files_model(comfyui_files).items()
                                            if k not in ("path", "family")}, "transformer_path": str(turbo)},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64]}, "network": {"linear": 4},
              "train": {"steps": 4, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(tmp_path), "save_every": 1000}, "sample": {"sample_every": 0}}
    result, lora = train_cli(config, str(tmp_path),
                             env={**os.environ, "LORALAB_COMFYUI": comfyui_source()})  # the tokenizer's source
    assert "looks like Z-Image Turbo" in result.stdout  # the coach's warning, at the run's start
    assert set(load_file(lora)) == set(load_file(from_folder))
    pipeline = _pipeline(folder)
    pipeline.load_lora_weights(lora, adapter_name="files")
    assert len(get_peft_model_state_dict(pipeline.transformer, adapter_name="files")) == len(load_file(lora))


def test_comfyui_names_our_real_width_layout_z_image(comfyui_report):
    """ComfyUI's detection picks Z-Image only at the real width (dim 3840)."""
    assert comfyui_report[0]["detected"] == {"model": "ZImage", "n_layers": 2, "text_encoder": "QWEN3_4B"}


def test_the_coach_warns_of_training_turbo_and_names_what_to_use(trained):
    from loralab.core.coach.plan import plan_dataset
    from loralab.core.families.zimage import FAMILY as zimage

    folder, data, _ = trained
    assert zimage.advice({"path": folder}) == []
    (message,) = zimage.advice({"path": "/models/Tongyi-MAI/Z-Image-Turbo/"})
    assert "Z-Image Turbo" in message and "Base, Tongyi-MAI/Z-Image" in message
    plan = plan_dataset(data, {"model": {"family": "zimage", "path": None,
                                         "transformer_path": "/m/z_image_turbo_bf16.safetensors"},
                               "dataset": {"folder": data}})
    assert [a.rule for a in plan.warnings if "Z-Image Turbo" in a.message] == ["model"]


def test_the_base_model_node_takes_comfyuis_three_files(comfyui_files, monkeypatch):
    from loralab.nodes.inputs import LoRALabLoadBaseModel

    monkeypatch.setenv("LORALAB_MODELS", os.path.dirname(os.path.dirname(comfyui_files["vae"])))
    names = {widget: os.path.basename(comfyui_files[part]) for widget, part in
             (("diffusion_model", "transformer"), ("text_encoder", "text_encoder"), ("vae", "vae"))}
    (model,) = LoRALabLoadBaseModel().load("auto", "", "fp32", "auto", **names)
    assert model.section["family"] == "zimage"
    assert model.section["text_encoder_path"] == comfyui_files["text_encoder"]


def test_a_short_fp8_run_trains_the_lora_the_unquantized_run_does(model, tmp_path):
    """model.quantize fp8 (the blocks' linears as Float8Linear) on the CPU: see fp8_training.py."""
    assert_fp8_trains_as_unquantized(*model, tmp_path)


def test_the_builtin_tiny_model_trains_on_the_demo_as_a_user_tries_it(tmp_path):
    """`builtin:tiny-zimage` on `builtin:demo` with the family's default samples (1024 px): the
    run finishes and the demo's finish step scores it at the size it trained at. (The tiny model's
    rope table once stopped at 512 px: the finish step crashed with an IndexError.)"""
    from loralab.core.config import resolve
    from loralab.core.demo.score import FILE
    from loralab.core.trainer import train

    config = resolve({"name": "try", "model": {"path": "builtin:tiny-zimage", "dtype": "fp32"},
                      "dataset": {"folder": "builtin:demo", "trigger_word": "sks", "resolution": [64]},
                      "train": {"steps": 2, "dtype": "fp32", "optimizer": "adamw"},
                      "save": {"output_dir": str(tmp_path)}, "sample": {"sample_every": 0, "sample_steps": 2}})
    assert (config["model"]["family"], config["sample"]["width"]) == ("zimage", 1024)
    result = train(config)
    assert result.status == "finished"
    with open(os.path.join(os.path.dirname(result.lora_path), FILE), encoding="utf-8") as f:
        assert set(json.load(f)) >= {"base", "lora", "seeds"}
    # and its samples at 1024 px have rope positions: 1024 / 8 (VAE) / 2 (patches) = 64 per side,
    # and index 64 is read (the IndexError above); drawing one takes minutes on a CPU, so the
    # table's size is read instead
    from loralab.core.families.builtin import resolve_model_path

    with open(os.path.join(resolve_model_path("builtin:tiny-zimage"), "transformer", "config.json")) as f:
        assert min(json.load(f)["axes_lens"][1:]) > 64
