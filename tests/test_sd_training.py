"""SDXL and SD1.5 training must learn, measured outside our code: the DDPM loss on the training
images with diffusers' own pipeline (its UNet, text encoding, VAE and DDPMScheduler.add_noise /
get_velocity) and the saved LoRA file loaded by diffusers' own load_lora_weights, at fixed noise
and timesteps. It must fall well under the base model's and be lowest at strength 1, so a sign
or scale error in training or in the file cannot pass."""
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from loralab.core.config import resolve
from loralab.core.dataset import load_for_bucket, scan_folder
from loralab.core.trainer import train, write_lora

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


pytestmark = pytest.mark.usefixtures("one_thread")


# sd_models and dataset: conftest.py's (session fixtures: other modules train on them too)


def run(folder, dataset, output, family, steps=50, network=None, lr=6e-3, resolution=64, **model):
    config = resolve({
        "name": f"learn_{family}", "model": {"path": folder, "dtype": "fp32", **model},
        "network": network or {},
        "dataset": {"folder": dataset, "trigger_word": "sks", "resolution": [resolution], "caption_dropout_rate": 0.0},
        "train": {"steps": steps, "lr": lr, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False},
        "save": {"save_every": 1000, "output_dir": str(output)},
        "sample": {"sample_every": 0}})
    assert config["model"]["family"] == family and config["save"]["format"] == "kohya"
    return train(config)


def ddpm_loss(pipeline, latents, text, added, target="epsilon"):
    """The mean DDPM loss at 8 fixed draws of noise and timesteps, by diffusers' own scheduler."""
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(50, 950, (latents.shape[0],), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            wanted = noise if target == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=text,
                                       added_cond_kwargs=added).sample
            losses.append(torch.nn.functional.mse_loss(prediction, wanted).item())
    return sum(losses) / len(losses)


def training_batch(pipeline, family, dataset, size=64):
    """Latents, text and (SDXL) pooled text + size conditioning of the training images (at
    size x size px), made by diffusers' own pipeline pieces."""
    items = scan_folder(dataset, "txt", "sks").items
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(load_for_bucket(i.path, (size, size)),
                                                                      dtype="float32")).permute(2, 0, 1)
                          for i in items]) / 127.5 - 1
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        captions = [i.caption for i in items]
        if family == "sd15":
            text, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
            return latents, text, None
        text, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[96, 96, 0, 0, size, size]] * len(items), dtype=torch.float32)  # demo: 96 px
    return latents, text, {"text_embeds": pooled, "time_ids": time_ids}


def strengths_of(pipeline, lora_path, batch, target="epsilon", strengths=(1.0, 0.5, 2.0, -1.0)):
    """(the base model's loss, the loss at each LoRA strength); each loss is 8 UNet passes."""
    base = ddpm_loss(pipeline, *batch, target=target)
    pipeline.load_lora_weights(lora_path, adapter_name="trained")
    by_strength = {}
    for strength in strengths:
        pipeline.set_adapters(["trained"], adapter_weights=[strength])
        by_strength[strength] = ddpm_loss(pipeline, *batch, target=target)
    return base, by_strength


# SD1.5 with the default LoRA (attention); SDXL also with its feed-forward and conv layers (LoCon
# at its own rank), so both layouts of the file are checked
@pytest.mark.parametrize("family, network", [("sd15", {}), ("sdxl", {"feed_forward": True, "conv": 4})])
def test_a_sd_lora_lowers_the_loss_on_its_training_images(family, network, sd_models, dataset, tmp_path):
    result = run(sd_models[family], dataset, tmp_path, family, network=network)
    with safe_open(result.lora_path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # kohya keys, by default
    assert metadata["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    pipeline = PIPELINES[family].from_pretrained(sd_models[family], local_files_only=True)
    batch = training_batch(pipeline, family, dataset)  # the LoRA is the UNet's only: encoded once
    base, by_strength = strengths_of(pipeline, result.lora_path, batch)
    assert by_strength[1.0] < 0.7 * base, (base, by_strength)
    assert by_strength[1.0] < by_strength[0.5] and by_strength[1.0] < by_strength[2.0], by_strength
    assert by_strength[-1.0] > 1.5 * by_strength[1.0], by_strength  # a sign error: the other way
    # the diffusers format of the same LoRA: diffusers' loader gives the very same losses
    path = write_lora(str(tmp_path / "diffusers.safetensors"), result.weights, result.config,
                      result.step, fmt="diffusers", dtype="float32")
    pipeline.unload_lora_weights()  # the same pipeline, back to the base model
    base_again, in_diffusers_format = strengths_of(pipeline, path, batch, strengths=(1.0, -1.0))
    assert base_again == pytest.approx(base, rel=1e-6)  # nothing of the first file is left
    assert in_diffusers_format == pytest.approx({s: by_strength[s] for s in (1.0, -1.0)}, rel=2e-3), \
        (in_diffusers_format, by_strength)


def test_a_v_prediction_model_trains_against_the_v_target(sd_models, dataset, tmp_path):
    """prediction_type v_prediction (as a v-pred checkpoint says, or set by hand): the LoRA lowers
    the loss against diffusers' get_velocity target, not against the noise."""
    result = run(sd_models["sd15"], dataset, tmp_path, "sd15", prediction_type="v_prediction")
    pipeline = StableDiffusionPipeline.from_pretrained(sd_models["sd15"], local_files_only=True)
    batch = training_batch(pipeline, "sd15", dataset)
    base, by_strength = strengths_of(pipeline, result.lora_path, batch, target="v_prediction", strengths=(1.0, -1.0))
    assert by_strength[1.0] < 0.7 * base, (base, by_strength)
    assert by_strength[-1.0] > 1.5 * by_strength[1.0], by_strength


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_make_tiny_model_writes_a_folder_and_a_checkpoint_of_the_family(family, tmp_path):
    """`loralab make-tiny-model sd15|sdxl DIR --single-file F`: a diffusers folder diffusers opens,
    and one checkpoint whose keys say the family (and ComfyUI-style original keys)."""
    from conftest import run_cli
    from loralab.core.families.unet.files import detect

    checkpoint = tmp_path / f"tiny-{family}.safetensors"
    result = run_cli("make-tiny-model", family, str(tmp_path / family), "--single-file", str(checkpoint))
    assert result.returncode == 0, result.stderr[-2000:]
    assert detect(str(checkpoint)) == {"family": family, "prediction_type": "epsilon"}
    with safe_open(str(checkpoint), "pt") as f:
        assert any(key.startswith("model.diffusion_model.") for key in f.keys())
    pipeline = PIPELINES[family].from_pretrained(str(tmp_path / family), local_files_only=True)
    assert pipeline.unet.config.cross_attention_dim > 0
