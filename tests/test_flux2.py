"""FLUX.2 klein: `loralab train` (a subprocess, as a user runs it) on a tiny klein that this test
builds from diffusers' and transformers' own classes (not with our builder), with the real Qwen
tokenizer from ComfyUI's source. Checked against independent references:

- the flow-matching loss of the training images, computed here as diffusers'
  train_dreambooth_lora_flux2_klein.py computes it with Flux2KleinPipeline's own parts
  (encode_prompt, _patchify_latents, the VAE's batch-norm statistics, _pack_latents, the ids)
  after `load_lora_weights`, falls by >= 15%;
- our prompt encoding is the pipeline's;
- diffusers loads the file with every key taken, as it was saved, and only block layers;
- ComfyUI's own LoRA loader (comfy.lora with its FLUX key map, in ComfyUI's Python, on ComfyUI's
  Flux2 model built at the tiny sizes) uses every key, and its weight deltas, q/k/v as slices of
  ComfyUI's fused qkv, equal diffusers' fused ones.
"""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from loralab.core.demo.dataset import make_demo_dataset

from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source
from conftest import qwen3_tokenizer, tiny_qwen3, train_cli
from fp8_training import assert_fp8_trains_as_unquantized

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, HEAD_DIM, AXES, LAYERS, SINGLE_LAYERS, TEXT_DIM, LATENT = 2, 16, (4, 4, 4, 4), 1, 2, 16, 8


def build_klein(folder):
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen3_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(latent_channels=LATENT, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.bn.running_mean.uniform_(-0.3, 0.3)  # batch-norm statistics that are not the identity
    vae.bn.running_var.uniform_(0.5, 2.0)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
        # 27 layers: the pipeline stacks hidden states 9, 18 and 27
        text_encoder=tiny_qwen3(Qwen3ForCausalLM, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=27,
                                head_dim=8, tie_word_embeddings=True),
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(in_channels=LATENT * 4, num_layers=LAYERS, num_single_layers=SINGLE_LAYERS,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            joint_attention_dim=3 * TEXT_DIM, timestep_guidance_channels=256,
                                            axes_dims_rope=AXES, guidance_embeds=False))
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the tiny model's folder, three drawn training images): built once for this file."""
    root = tmp_path_factory.mktemp("flux2")
    return build_klein(str(root / "model")), make_demo_dataset(str(root / "data"), count=3)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2-trained")
    folder, data = model
    config = {"name": "k", "model": {"path": folder, "dtype": "fp32"},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
              "network": {"linear": 4},
              "train": {"steps": 250, "lr": 1e-2, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(root / "out"), "save_every": 1000}, "sample": {"sample_every": 0}}
    _, lora = train_cli(config, str(root))
    return folder, data, lora


def _pipeline(folder):
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference_loss(pipeline, latents, embeds):
    """train_dreambooth_lora_flux2_klein.py's loss at fixed noise and noise levels."""
    from diffusers import Flux2KleinPipeline as P

    generator = torch.Generator().manual_seed(123)
    ids = P._prepare_latent_ids(latents)
    text_ids = P._prepare_text_ids(embeds)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = (torch.rand(latents.shape[0], generator=generator) * 0.9 + 0.05).view(-1, 1, 1, 1)
            noisy = (1.0 - sigmas) * latents + sigmas * noise
            out = pipeline.transformer(hidden_states=P._pack_latents(noisy), timestep=sigmas.flatten(), guidance=None,
                                       encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                       return_dict=False)[0]
            prediction = P._unpack_latents_with_ids(out, ids)
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
        embeds, _ = pipeline.encode_prompt(list(captions))
    latents = pipeline._patchify_latents(latents)
    mean = pipeline.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipeline.vae.bn.running_var.view(1, -1, 1, 1) + pipeline.vae.config.batch_norm_eps)
    return (latents - mean) / std, embeds, captions


def test_training_lowers_diffusers_own_loss_on_the_training_images(trained):
    folder, data, lora = trained
    pipeline = _pipeline(folder)
    latents, embeds, _ = training_images(pipeline, data)
    base = reference_loss(pipeline, latents, embeds)
    pipeline.load_lora_weights(lora, adapter_name="trained")
    by_strength = {}
    for strength in (1.0, 0.5):
        pipeline.set_adapters(["trained"], adapter_weights=[strength])
        by_strength[strength] = reference_loss(pipeline, latents, embeds)
    assert by_strength[1.0] <= 0.85 * base, (base, by_strength)
    assert by_strength[1.0] < by_strength[0.5] < base, (base, by_strength)


def test_prompts_and_images_are_encoded_as_the_pipeline_encodes_them(trained):
    from PIL import Image

    from loralab.core.families.flux2 import FAMILY as flux2

    folder, data, _ = trained
    pipeline = _pipeline(folder)
    latents, embeds, captions = training_images(pipeline, data)
    ours = flux2.encode_prompts(pipeline, captions + [""], "cpu")
    for caption, reference in zip(captions, embeds):
        assert torch.allclose(ours[caption][0], reference, atol=1e-5)
    names = sorted(n for n in os.listdir(data) if n.endswith(".png"))
    image = Image.open(os.path.join(data, names[0])).convert("RGB").resize((64, 64))
    assert torch.allclose(flux2.encode_image(pipeline, image, "cpu"), latents[0], atol=1e-4)


def test_file_loads_whole_in_diffusers_with_block_layers_only(trained):
    from peft.utils import get_peft_model_state_dict

    folder, _, lora = trained
    pipeline = _pipeline(folder)
    pipeline.load_lora_weights(lora, adapter_name="trained")
    file = load_file(lora)
    assert file and all(k.startswith("transformer.") and ".lora_" in k for k in file)
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name="trained")
    assert set(loaded) == {k[len("transformer."):] for k in file}
    assert all(torch.equal(loaded[k[len("transformer."):]].to(v.dtype), v) for k, v in file.items())
    modules = {k.split(".lora_")[0] for k in loaded}  # ComfyUI has names only for the blocks' layers
    assert all(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in modules), sorted(modules)
    assert len(modules) == 12 * LAYERS + 2 * SINGLE_LAYERS, sorted(modules)


COMFYUI_SCRIPT = COMFYUI_HEAD + r'''
# ComfyUI's Flux2 (as model_detection configures a FLUX.2 transformer), at the tiny sizes
unet_config = {"image_model": "flux2", "mlp_ratio": 3.0, "theta": 2000, "global_modulation": True,
               "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False, "default_ref_method": "index",
               "ref_index_scale": 10.0, "txt_ids_dims": [3], "patch_size": 1, "vec_in_dim": None,
               "guidance_embed": False, "yak_mlp": False, "txt_norm": False, **job["config"]}
model = comfy.supported_models.Flux2(unet_config).get_model({})
key_map = comfy.lora.model_lora_keys_unet(model, {})
weights = model.state_dict()
warnings.clear()
patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(job["lora"])), key_map)
deltas = {}
for target, patch in patches.items():
    key, offset = target if isinstance(target, tuple) else (target, None)
    base = deltas.get(key, torch.zeros_like(weights[key], dtype=torch.float32))
    deltas[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, offset, None)], base, key)
# back to diffusers' names by ComfyUI's own map: q, k and v are slices of its fused qkv
named = {}
for diffusers_name, to in comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.").items():
    key, piece = (to[0], to[1]) if isinstance(to, tuple) else (to, None)
    if key in deltas:
        named[diffusers_name] = deltas[key] if piece is None else deltas[key].narrow(*piece)
save_file({k: v.clone() for k, v in named.items()}, job["out"])  # FLUX.1 names share keys
print(json.dumps({"warnings": list(warnings), "targets": len(patches), "comfy_keys": sorted(deltas)}))
'''


def test_comfyui_uses_every_key_with_diffusers_deltas(trained, tmp_path):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    folder, _, lora = trained
    config = {"in_channels": LATENT * 4, "out_channels": LATENT * 4, "hidden_size": HEADS * HEAD_DIM,
              "num_heads": HEADS, "axes_dim": list(AXES), "context_in_dim": 3 * TEXT_DIM, "depth": LAYERS,
              "depth_single_blocks": SINGLE_LAYERS}
    job = {"config": config, "lora": lora, "out": str(tmp_path / "deltas.safetensors")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = subprocess.run([python, "-c", COMFYUI_SCRIPT, str(tmp_path / "job.json")], cwd=comfyui,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads(result.stdout.strip().splitlines()[-1])
    comfy = load_file(job["out"])
    assert not [w for w in used["warnings"] if "not loaded" in w or "lora" in w.lower()], used["warnings"]
    assert used["targets"] == sum(1 for k in load_file(lora) if ".lora_A." in k)
    assert any(k.endswith("img_attn.qkv.weight") for k in used["comfy_keys"])

    # diffusers' deltas: the weights after fuse_lora less before
    pipeline = _pipeline(folder)
    before = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    pipeline.load_lora_weights(lora)
    pipeline.fuse_lora(lora_scale=1.0)
    after = {k.replace(".base_layer", ""): v for k, v in pipeline.transformer.state_dict().items()}
    expected = {k: after[k] - v for k, v in before.items() if not torch.equal(after[k], v)}
    assert len(expected) == used["targets"]  # diffusers took every module of the file
    comfy = {k: v for k, v in comfy.items() if k in before}  # the map also names FLUX.1's modules
    changed = {k for k, v in comfy.items() if v.abs().max() > 0}
    assert changed == set(expected), sorted(changed ^ set(expected))
    for key in expected:
        assert torch.allclose(comfy[key], expected[key], rtol=1e-4, atol=1e-6), key


def test_the_coach_warns_of_training_a_distilled_klein(trained, tmp_path):
    from loralab.core.families.flux2 import FAMILY as flux2

    assert flux2.advice({"path": trained[0]}) == []  # our klein is base (is_distilled false)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    (message,) = flux2.advice({"path": str(tmp_path)})
    assert "step-distilled" in message and "FLUX.2-klein-base" in message


def test_a_short_fp8_run_trains_the_lora_the_unquantized_run_does(model, tmp_path):
    """model.quantize fp8 (the blocks' linears as Float8Linear) on the CPU: see fp8_training.py."""
    assert_fp8_trains_as_unquantized(*model, tmp_path)
