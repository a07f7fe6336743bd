"""Preservation against bleed (train.preservation_class, train.preservation_weight): measured by
running the trained models, not by reading our loss. The LoRA file is loaded with diffusers' own
load_lora_weights; at fixed noise and noise levels, its prediction for the class caption ("a
photo of star ...") must stay closer to the base model's with preservation than without, while
the training captions' loss still falls. Tiny random models, real training."""
import os

import pytest
import torch
from diffusers import DDPMScheduler, FluxPipeline, StableDiffusionPipeline

from loralab.core.config import ConfigError, resolve
from loralab.core.dataset import load_for_bucket, scan_folder
from loralab.core.families import get_family
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.parts import flow
from loralab.core.families.preservation import class_caption
from loralab.core.lora import add_lora
from loralab.core.runs import RunFolder
from loralab.core.trainer import train

from conftest import train_in_processes

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32  # pixels: the smallest training resolution, for speed


def config(model, folder, output, steps, lr, network=None, **train_settings):
    return resolve({
        "name": "keep", "model": {"path": model, "dtype": "fp32"}, "network": network or {},
        "dataset": {"folder": folder, "trigger_word": "sks", "resolution": [SIZE], "caption_dropout_rate": 0.0},
        "train": {"steps": steps, "lr": lr, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, **train_settings},
        "save": {"save_every": 1000, "output_dir": str(output), "dtype": "float32"},
        "sample": {"sample_every": 0}})


def training_images(family, pipeline, folder):
    """(latents [N, C, h, w] of the training images at SIZE, their captions)."""
    items = scan_folder(folder, "txt", "sks").items
    latents = [get_family(family).encode_image(pipeline, load_for_bucket(i.path, (SIZE, SIZE)), "cpu") for i in items]
    return torch.stack(latents), [item.caption for item in items]


def class_captions(captions):
    return [class_caption(caption, "sks", "star") for caption in captions]


def guidance(pipeline):
    return 1.0 if flux.uses_guidance(pipeline) else None


DRAWS = 6  # fixed draws of noise and noise level per measurement


def flux_outputs(pipeline, latents, captions):
    """(prediction, target) of the transformer at the DRAWS fixed draws."""
    encoded = flux.encode_prompts(pipeline, captions, "cpu")
    text = torch.stack([encoded[c][0] for c in captions])
    pooled = torch.stack([encoded[c][1] for c in captions])
    generator = torch.Generator().manual_seed(123)
    noises = torch.randn((DRAWS, *latents.shape), generator=generator)
    sigmas = torch.rand((DRAWS, len(latents)), generator=generator) * 0.9 + 0.05
    outputs = []
    for noise, sigma in zip(noises, sigmas):
        noisy, target = flow.noisy_latents(latents, noise, sigma)
        with torch.no_grad():
            prediction = flux.predict(pipeline.transformer, flow.pack(noisy), sigma, text, pooled,
                                      latents.shape[2], latents.shape[3], guidance(pipeline))
        outputs.append((prediction, flow.pack(target)))
    return outputs


def sd_outputs(pipeline, latents, captions):
    """(prediction, target) of the UNet at the DRAWS fixed draws, the captions encoded by
    diffusers' encode_prompt (through a text-encoder LoRA, when one is loaded)."""
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(123)
    noises = torch.randn((DRAWS, *latents.shape), generator=generator)
    timesteps = torch.randint(50, 950, (DRAWS, len(latents)), generator=generator)
    with torch.no_grad():
        text, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
        return [(pipeline.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample, noise)
                for noise, t in zip(noises, timesteps)]


def mse(pairs):
    return sum(torch.nn.functional.mse_loss(a, b).item() for a, b in pairs) / len(pairs)


def measure(pipeline, lora_path, outputs, latents, captions):
    """{"bleed": how far the LoRA moves the class captions' prediction from the base model's,
    "loss": the training captions' loss with the LoRA, "base_loss": without it}, at the same
    draws of noise."""
    base_class, base_own = outputs(pipeline, latents, class_captions(captions)), outputs(pipeline, latents, captions)
    pipeline.load_lora_weights(lora_path, adapter_name="trained")
    lora_class, lora_own = outputs(pipeline, latents, class_captions(captions)), outputs(pipeline, latents, captions)
    pipeline.unload_lora_weights()
    return {"bleed": mse([(a[0], b[0]) for a, b in zip(lora_class, base_class)]),
            "loss": mse(lora_own), "base_loss": mse(base_own)}


def assert_less_bleed(with_it, without):
    assert with_it["bleed"] < 0.5 * without["bleed"], (with_it, without)
    # the concept is still learned: the training captions' loss falls well below the base's
    assert with_it["loss"] < 0.8 * with_it["base_loss"], with_it
    assert with_it["loss"] < 1.25 * without["loss"], (with_it, without)


def test_preservation_keeps_flux_closer_to_the_base_on_the_class_caption(tiny_flux, dataset, tmp_path):
    runs = {name: train(config(tiny_flux, dataset, tmp_path / name, 40, 4e-3, **settings))
            for name, settings in [("off", {}), ("on", {"preservation_class": "star"})]}
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    latents, captions = training_images("flux", pipeline, dataset)
    without, with_it = (measure(pipeline, runs[name].lora_path, flux_outputs, latents, captions)
                        for name in ("off", "on"))
    assert_less_bleed(with_it, without)


def test_preservation_keeps_sd15_with_a_text_encoder_lora_closer_to_the_base(sd_models, dataset, tmp_path):
    """SD1.5 with network.text_encoder: the class captions are encoded every step, through the
    text-encoder LoRA for the LoRA's prediction and without it for the base's."""
    network = {"linear": 4, "text_encoder": True}
    runs = {name: train(config(sd_models["sd15"], dataset, tmp_path / name, 30, 1e-2, network, **settings))
            for name, settings in [("off", {}), ("on", {"preservation_class": "star"})]}
    pipeline = StableDiffusionPipeline.from_pretrained(sd_models["sd15"], local_files_only=True)
    latents, captions = training_images("sd15", pipeline, dataset)
    without, with_it = (measure(pipeline, runs[name].lora_path, sd_outputs, latents, captions)
                        for name in ("off", "on"))
    assert_less_bleed(with_it, without)


def test_weight_zero_trains_the_same_weights_as_off(tiny_flux, dataset, tmp_path):
    results = [train(config(tiny_flux, dataset, tmp_path / name, 4, 4e-3, **settings))
               for name, settings in [("off", {}), ("zero", {"preservation_class": "star",
                                                             "preservation_weight": 0.0})]]
    off, zero = (result.weights for result in results)
    assert off.keys() == zero.keys() and all(torch.equal(off[k], zero[k]) for k in off)


def test_sdxl_trains_with_preservation(sd_models, dataset, tmp_path):
    """SDXL's pooled text and size conditioning go along with the class captions."""
    result = train(config(sd_models["sdxl"], dataset, tmp_path, 3, 1e-3, preservation_class="star"))
    assert result.status == "finished" and result.weights


def test_the_loss_adds_the_drift_of_entries_with_the_trigger_only(tiny_flux):
    """flux.training_loss on a batch of two: a mask of zeros adds nothing; a mask on the first
    entry adds weight x its drift from the base model, over the batch size, at the same noise."""
    family = get_family("flux")
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    model = pipeline.transformer
    add_lora(model, 4, 4, family.lora_targets({}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    encoded = flux.encode_prompts(pipeline, ["a photo of sks", "a photo of star", ""], "cpu")
    text = lambda *captions: torch.stack([encoded[c][0] for c in captions])
    pooled = lambda *captions: torch.stack([encoded[c][1] for c in captions])
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
             "text": text("a photo of sks", ""), "pooled": pooled("a photo of sks", ""),
             "preservation_text": text("a photo of star", ""), "preservation_pooled": pooled("a photo of star", ""),
             "preservation_base_text": text("a photo of star", ""),
             "preservation_base_pooled": pooled("a photo of star", "")}
    train_config = {"timestep_type": "sigmoid", "guidance": 1.0, "preservation_weight": 3.0}

    def loss(mask=None):
        extra = {} if mask is None else {"preservation_mask": torch.tensor(mask)}
        return family.training_loss(model, {**batch, **extra}, torch.Generator().manual_seed(5),
                                    train_config, flux.uses_guidance(pipeline)).item()

    plain = loss()
    assert loss([0.0, 0.0]) == plain
    # the same draws as training_loss makes, to predict the first entry by hand
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    sigmas = flow.sample_sigmas(2, "sigmoid", num_tokens=16, generator=generator)
    packed = flow.pack(flow.noisy_latents(batch["latents"], noise, sigmas)[0])[:1]
    with torch.no_grad():
        lora = flux.predict(model, packed, sigmas[:1], text("a photo of star"), pooled("a photo of star"), 8, 8, guidance(pipeline))
        model.disable_adapters()
        base = flux.predict(model, packed, sigmas[:1], text("a photo of star"), pooled("a photo of star"), 8, 8, guidance(pipeline))
        model.enable_adapters()
    drift = torch.nn.functional.mse_loss(lora, base).item()
    assert drift > 1e-4
    assert loss([1.0, 0.0]) == pytest.approx(plain + 3.0 * drift / 2, rel=1e-4)


def test_class_caption_replaces_the_trigger_as_a_word():
    assert class_caption("a photo of sks on a red background", "sks", "star") == "a photo of star on a red background"
    assert class_caption("sks, a photo", "sks", "star") == "star, a photo"
    assert class_caption("", "sks", "star") is None  # a dropped-out caption adds nothing
    assert class_caption("a photo of skses", "sks", "star") is None
    assert class_caption("a photo of sks", "sks", "") is None


def test_preservation_needs_a_trigger_word_and_a_weight_of_at_least_zero(make_config):
    with pytest.raises(ConfigError) as error:
        resolve(make_config(dataset={"trigger_word": ""}, train={"preservation_class": "star"}))
    message = str(error.value)
    assert "train.preservation_class" in message and "dataset.trigger_word" in message, message
    assert "set dataset.trigger_word" in message
    with pytest.raises(ConfigError, match=r"train.preservation_weight = -1: must be at least 0"):
        resolve(make_config(train={"preservation_class": "star", "preservation_weight": -1}))
    resolved = resolve(make_config())
    assert resolved["train"]["preservation_class"] == "" and resolved["train"]["preservation_weight"] == 1.0


def test_configure_lora_offers_preservation_as_optional_widgets_and_train_lora_checks_the_trigger(
        tiny_flux, demo_dataset):
    """Optional widgets (saved workflows keep their widget order); ConfigureLoRA alone accepts a
    class word, TrainLoRA refuses it for a dataset without a trigger word, naming both keys."""
    import loralab
    from test_nodes import FAST_SETTINGS, call, widget_defaults

    optional = loralab.NODE_CLASS_MAPPINGS["LoRALabConfigureLoRA"].INPUT_TYPES()["optional"]
    names = list(optional)  # widgets added later stand after these, so saved workflows keep their order
    assert names[names.index("text_encoder_lr") + 1:][:2] == ["preservation_class", "preservation_weight"]
    assert optional["preservation_class"][1]["default"] == ""
    assert optional["preservation_weight"][1]["default"] == 1.0
    config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"), **FAST_SETTINGS,
                                             "preservation_class": "star", "preservation_weight": 0.5})
    assert config.sections["train"]["preservation_class"] == "star"
    assert config.sections["train"]["preservation_weight"] == 0.5
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32", quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    with pytest.raises(Exception, match=r"train.preservation_class = \"star\" needs dataset.trigger_word"):
        call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config, name="x", resume=True)


def test_two_processes_train_with_preservation_and_gradient_checkpointing(make_config, tmp_path):
    """torchrun with two CPU processes (accelerate's DDP): the class entries join the batch's
    forward, so DDP all-reduces once per step, whichever entries of each rank hold the trigger
    (caption dropout empties some); with gradient checkpointing the backward recomputes the
    blocks with the LoRA on, after the base prediction had it off."""
    raw = make_config(name="ddp_keep", dataset={"resolution": [32], "caption_dropout_rate": 0.5},
                      train={"steps": 6, "preservation_class": "star", "gradient_checkpointing": True})
    result = train_in_processes(raw, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = RunFolder(resolve(raw)["save"]["output_dir"], "ddp_keep")
    assert os.path.isfile(run.final_lora) and run.read_metrics()[-1]["skipped_steps"] == 0
