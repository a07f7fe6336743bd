"""FLUX.2 klein: `loralab train` (a subprocess, as a user runs it) on a tiny klein that this test
builds from diffusers' and transformers' own classes (not with our builder), with the real Qwen
tokenizer from ComfyUI's source. Checked against independent references:

- the flow-matching loss of the training images, computed here as diffusers'
  train_dreambooth_lora_flux2_klein.py computes it with Flux2KleinPipeline's own parts
  (encode_prompt, _patchify_latents, the VAE's batch-norm statistics, _pack_latents, the ids)
  after `load_lora_weights`, falls by >= 15%;
- our prompt encoding is the pipeline's;
- diffusers loads the file with every key taken, as it was saved, and only block layers.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from loralab.core.demo.dataset import make_demo_dataset

from comfyui_env import comfyui_source, skip
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, HEAD_DIM, AXES, LAYERS, SINGLE_LAYERS, TEXT_DIM, LATENT = 2, 16, (4, 4, 4, 4), 1, 2, 16, 8
# Qwen3's chat template, reduced to one user message (the real one adds no system message)
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def build_klein(folder):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer_files = os.path.join(comfyui_source(), "comfy", "text_encoders", "qwen25_tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_files, "vocab.json")):
        skip(f"the Qwen tokenizer comes from ComfyUI's source; not found at {tokenizer_files}")
    torch.manual_seed(0)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_files)
    tokenizer.chat_template = QWEN3_TEMPLATE
    vae = AutoencoderKLFlux2(latent_channels=LATENT, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.bn.running_mean.uniform_(-0.3, 0.3)  # batch-norm statistics that are not the identity
    vae.bn.running_var.uniform_(0.5, 2.0)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
        # 27 layers: the pipeline stacks hidden states 9, 18 and 27
        text_encoder=Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=TEXT_DIM, intermediate_size=32,
                                                  num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                                  head_dim=8, tie_word_embeddings=True)),
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(in_channels=LATENT * 4, num_layers=LAYERS, num_single_layers=SINGLE_LAYERS,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            joint_attention_dim=3 * TEXT_DIM, timestep_guidance_channels=32,
                                            axes_dims_rope=AXES, guidance_embeds=False))
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    folder = build_klein(str(root / "model"))
    data = make_demo_dataset(str(root / "data"), count=3)
    config = {"name": "k", "model": {"path": folder, "dtype": "fp32"},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
              "network": {"linear": 4},
              "train": {"steps": 120, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(root / "out"), "save_every": 1000}, "sample": {"sample_every": 0}}
    with open(root / "config.json", "w") as f:
        json.dump(config, f)
    result = run_cli("train", str(root / "config.json"), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lora = json.loads(result.stdout.strip().splitlines()[-1])["lora"]
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
