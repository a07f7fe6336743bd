"""The SD1.5 and SDXL families (core/families/sd15, sdxl) on tiny random diffusers pipelines,
measured against diffusers' own encode_prompt, _get_add_time_ids, VAE and UNet."""
import numpy
import pytest
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from peft import LoraConfig
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from loralab.core.families.sd15 import FAMILY as sd15
from loralab.core.families.sdxl import FAMILY as sdxl
from loralab.core.families.parts.tiny import write_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread

SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                 steps_offset=1)
PROMPTS = ["a photo of a red cat", "sks dog on a blue street"]


def _text_encoder(model_class, tokenizer, hidden=32):
    # three layers, so the last, the penultimate and the one before differ
    return model_class(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()


def _unet(family_name):
    """A two-level UNet of the family's layout: SD1.5 cross-attends to one 32-wide encoder; SDXL
    to two side by side (64) and adds the pooled embedding and six size ids."""
    blocks = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    if family_name == "sd15":
        return UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, **blocks)
    return UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8, **blocks)


def _pipeline(family_name, folder):
    """A tiny random pipeline of the real layout: an 8x VAE, a two-level UNet, CLIP encoders."""
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(str(folder / "tokenizer"))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                        norm_num_groups=8, latent_channels=4, scaling_factor=0.13025)
    parts = dict(vae=vae, text_encoder=_text_encoder(CLIPTextModel, tokenizer), tokenizer=tokenizer,
                 unet=_unet(family_name), scheduler=DDPMScheduler(**SCHEDULER))
    if family_name == "sd15":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    tokenizer_2 = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                str(folder / "tokenizer" / "merges.txt"), model_max_length=77,
                                pad_token="!")  # OpenCLIP pads with "!"
    return StableDiffusionXLPipeline(
        **parts, text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tokenizer_2),
        tokenizer_2=tokenizer_2)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    built = {"sd15": _pipeline("sd15", folder / "sd15"), "sdxl": _pipeline("sdxl", folder / "sdxl")}
    for pipeline in built.values():
        pipeline.unet.eval()
        sd15.trainable_model(pipeline)  # the UNet remembers its scheduler, as load does
    return built


FAMILIES = {"sd15": sd15, "sdxl": sdxl}


def test_sdxl_prompts_equal_diffusers_encode_prompt(pipelines):
    pipeline = pipelines["sdxl"]
    encoded = sdxl.encode_prompts(pipeline, PROMPTS + [""], "cpu")
    for prompt in PROMPTS + [""]:
        embeds, _, pooled, _ = pipeline.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        assert encoded[prompt][0].shape == (77, 64) and encoded[prompt][1].shape == (32,)
        assert torch.allclose(encoded[prompt][0], embeds[0], atol=1e-6)
        assert torch.allclose(encoded[prompt][1], pooled[0], atol=1e-6)
    assert not torch.allclose(encoded[PROMPTS[0]][0], encoded[PROMPTS[1]][0])
    # A1111's clip skip 1 and 2 are SDXL's own penultimate layer; 3 is the layer before it:
    # diffusers' clip_skip 1
    skipped = {}
    for clip_skip in (1, 2, 3):
        pipeline.loralab_clip_skip = clip_skip
        try:
            skipped[clip_skip] = sdxl.encode_prompts(pipeline, PROMPTS[:1], "cpu")[PROMPTS[0]][0]
        finally:
            del pipeline.loralab_clip_skip
    assert torch.equal(skipped[1], encoded[PROMPTS[0]][0]) and torch.equal(skipped[2], skipped[1])
    skipped = skipped[3]
    reference = pipeline.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False,
                                       clip_skip=1)[0][0]
    assert torch.allclose(skipped, reference, atol=1e-6)
    assert not torch.allclose(skipped, encoded[PROMPTS[0]][0], atol=1e-3)


@pytest.mark.parametrize("clip_skip, diffusers_clip_skip", [(None, None), (1, None), (2, 1), (3, 2)])
def test_sd15_prompts_equal_diffusers_encode_prompt(pipelines, clip_skip, diffusers_clip_skip):
    """A1111/kohya count the layer used from the end (2 = penultimate); diffusers counts the
    layers skipped (1 = penultimate); both put it through the final layer norm."""
    pipeline = pipelines["sd15"]
    pipeline.loralab_clip_skip = clip_skip
    try:
        encoded = sd15.encode_prompts(pipeline, PROMPTS, "cpu")
    finally:
        del pipeline.loralab_clip_skip
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5's
    # CLIPTextModel holds directly: point text_model at the model (not as a submodule).
    encoder = pipeline.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)
    for prompt in PROMPTS:
        reference = pipeline.encode_prompt(prompt, "cpu", 1, False, clip_skip=diffusers_clip_skip)[0][0]
        assert encoded[prompt][0].shape == (77, 32) and encoded[prompt][1].numel() == 0
        assert torch.allclose(encoded[prompt][0], reference, atol=1e-5)
    last = pipeline.encode_prompt(PROMPTS[0], "cpu", 1, False)[0][0]
    assert torch.allclose(encoded[PROMPTS[0]][0], last, atol=1e-5) == (diffusers_clip_skip is None)


def _image(seed, size=(64, 64)):
    generator = numpy.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in generator.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = generator.integers(0, size[0], 2)
        draw.ellipse((x - 12, y - 12, x + 12, y + 12), fill=tuple(int(c) for c in generator.integers(0, 255, 3)))
    return image


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_image_is_the_vae_latent_times_its_scaling_factor(pipelines, name):
    pipeline = pipelines[name]
    image = _image(1, (64, 48))
    torch.manual_seed(5)
    latent = FAMILIES[name].encode_image(pipeline, image, "cpu")
    pixels = torch.from_numpy(numpy.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.manual_seed(5)
    with torch.no_grad():
        reference = pipeline.vae.encode(pixels).latent_dist.sample() * pipeline.vae.config.scaling_factor
    assert latent.shape == (4, 6, 8) and latent.dtype == torch.float32
    assert torch.allclose(latent, reference[0], atol=1e-5)


def test_sdxl_size_conditioning_follows_the_bucket(pipelines):
    """The time ids the UNet receives equal diffusers' own _get_add_time_ids for each sample's
    original size, crop and the bucket (target) size."""
    pipeline = pipelines["sdxl"]
    unet = pipeline.unet
    seen = []
    hook = unet.add_time_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = {"latents": torch.randn(2, 4, 6, 8), "text": torch.randn(2, 77, 64), "pooled": torch.randn(2, 32),
             "original_size": torch.tensor([[900, 1600], [48, 64]]),
             "crop_top_left": torch.tensor([[0, 53], [0, 0]])}
    try:
        with torch.no_grad():
            sdxl.training_loss(unet, batch, torch.Generator().manual_seed(0), {}, False)
    finally:
        hook.remove()
    reference = torch.cat([pipeline._get_add_time_ids((900, 1600), (0, 53), (48, 64), torch.float32, 32),
                           pipeline._get_add_time_ids((48, 64), (0, 0), (48, 64), torch.float32, 32)])
    assert torch.equal(seen[0], reference.flatten())


def _adapted_modules(unet):
    return {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_targets_attention_then_feed_forward_then_convolutions(name):
    unet = _unet(name)
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    attention = {n for n in linears if ".transformer_blocks." in n and n.split(".attn")[-1][:1] in "12"
                 and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    feed_forward = {n for n in linears if n.endswith(("ff.net.0.proj", "ff.net.2"))}
    convolutions = {n for n, m in unet.named_modules()
                    if isinstance(m, torch.nn.Conv2d) and ".resnets." in n and n.endswith(("conv1", "conv2"))}
    assert attention and feed_forward and convolutions
    family = FAMILIES[name]
    assert family.lora_targets({"linear": 4}) == {"target_modules": family.LORA_TARGETS}
    for network, wanted in (({}, attention), ({"feed_forward": True}, attention | feed_forward),
                            ({"feed_forward": True, "conv": 2, "conv_alpha": 1}, attention | feed_forward | convolutions)):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, **family.lora_targets(network)))
        adapted = _adapted_modules(unet)
        assert set(adapted) == wanted
        for module_name, module in adapted.items():
            conv = module_name in convolutions
            assert module.r["default"] == (2 if conv else 4)
            assert module.scaling["default"] == (0.5 if conv else 2.0)
        unet.unload_lora()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, **family.lora_targets({"conv": 3})))
    assert all(m.scaling["default"] == 1.0 for n, m in _adapted_modules(unet).items() if n in convolutions)


def _reference_loss(pipeline, latents, text, pooled, noises, timesteps):
    """diffusers' own DDPM noising and UNet at fixed noise and timesteps: the epsilon MSE."""
    scheduler, unet = DDPMScheduler(**SCHEDULER), pipeline.unet
    total = 0.0
    with torch.no_grad():
        for noise, t in zip(noises, timesteps):
            added = None
            if pooled is not None:
                height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
                ids = pipeline._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32, 32)
                added = {"text_embeds": pooled, "time_ids": ids.repeat(len(latents), 1)}
            prediction = unet(scheduler.add_noise(latents, noise, t), t, text, added_cond_kwargs=added).sample
            total += torch.nn.functional.mse_loss(prediction, noise).item()
    return total / len(noises)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_a_lora_lowers_the_loss(pipelines, name):
    """A few dozen steps of a peft LoRA through the family's lora_targets and training_loss on two
    fixed images lower the loss diffusers' own UNet gives at fixed noise and timesteps; then
    remove_lora gives back the base model."""
    pipeline, family = pipelines[name], FAMILIES[name]
    unet = family.trainable_model(pipeline)
    latents = torch.stack([family.encode_image(pipeline, _image(seed), "cpu") for seed in (1, 2)])
    encoded = family.encode_prompts(pipeline, PROMPTS, "cpu")
    text = torch.stack([encoded[p][0] for p in PROMPTS])
    pooled = torch.stack([encoded[p][1] for p in PROMPTS])
    size = torch.tensor([[64, 64], [64, 64]])
    batch = {"latents": latents, "text": text, "pooled": pooled, "original_size": size,
             "crop_top_left": torch.zeros(2, 2)}
    fixed = torch.Generator().manual_seed(123)
    noises = [torch.randn(latents.shape, generator=fixed) for _ in range(6)]
    timesteps = [torch.randint(0, 1000, (2,), generator=fixed) for _ in range(6)]
    reference = lambda: _reference_loss(pipeline, latents, text, pooled if name == "sdxl" else None,
                                        noises, timesteps)
    with torch.no_grad():
        base_output = unet(latents, torch.tensor([500, 500]), text,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.full((2, 6), 64.0)}
                           if name == "sdxl" else None).sample
    before = reference()

    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=True,
                                **family.lora_targets({"feed_forward": True, "conv": 4})))
    parameters = [p for n, p in unet.named_parameters() if "lora_" in n]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(40):
        loss = family.training_loss(unet, batch, generator, {"min_snr_gamma": 5.0}, False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.eval()
    after = reference()
    assert after < 0.85 * before, (before, after)

    family.remove_lora(pipeline)
    assert not _adapted_modules(unet) and not getattr(unet, "peft_config", None)
    unet.requires_grad_(False)
    with torch.no_grad():
        output = unet(latents, torch.tensor([500, 500]), text,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.full((2, 6), 64.0)}
                      if name == "sdxl" else None).sample
    assert torch.equal(output, base_output)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_makes_images_of_the_asked_size_from_cached_embeddings(pipelines, name):
    """Sampling reads cached embeddings only: it runs with the text encoders freed, is the same
    for the same seed, and leaves the pipeline's own scheduler in place."""
    pipeline, family = pipelines[name], FAMILIES[name]
    encoded = family.encode_prompts(pipeline, PROMPTS + [""], "cpu")
    encoders = {n: getattr(pipeline, n) for n in ("text_encoder", "text_encoder_2") if n in pipeline.components}
    scheduler = pipeline.scheduler
    family.free_text_encoders(pipeline)
    try:
        assert all(getattr(pipeline, n) is None for n in encoders)
        embeds = [encoded[p] for p in PROMPTS]
        run = lambda seed, negative=encoded[""]: family.generate(pipeline, embeds, seed, 3, 5.0, 64, 48,
                                                                 "cpu", negative_embeds=negative)
        first, again, other = run(7), run(7), run(8)
        zeros = run(7, None)
    finally:
        pipeline.register_modules(**encoders)
    assert pipeline.scheduler is scheduler
    assert len(first) == 2 and all(image.size == (64, 48) and image.mode == "RGB" for image in first)
    arrays = [numpy.asarray(image) for image in first]
    assert all(numpy.array_equal(a, numpy.asarray(b)) for a, b in zip(arrays, again))
    assert not numpy.array_equal(arrays[0], numpy.asarray(other[0]))
    assert not numpy.array_equal(arrays[0], arrays[1])  # the prompt matters
    assert len(zeros) == 2 and zeros[0].size == (64, 48)
    assert not numpy.array_equal(arrays[0], numpy.asarray(zeros[0]))  # the negative is used


@pytest.mark.parametrize("name", FAMILIES)
def test_load_remembers_the_schedule_and_encoders_come_back_after_freeing(name, tmp_path):
    """Through the real loader (a tiny diffusers folder): the UNet carries the scheduler's
    prediction type and VAE downscale for training_loss; text encoders freed after caching load
    again on the next encode_prompts and give the same embeddings."""
    from loralab.core.families.unet.tiny import build_tiny

    family = FAMILIES[name]
    folder = build_tiny(name, str(tmp_path / name))
    model = {"path": folder, "dtype": "fp32", "prediction_type": "v_prediction", "clip_skip": 2}
    pipeline = family.load(model, "none")
    unet = family.trainable_model(pipeline)
    assert unet.loralab_noise_config["prediction_type"] == "v_prediction"
    assert unet.loralab_vae_scale_factor == pipeline.vae_scale_factor == family.size_multiple(pipeline)
    first = family.encode_prompts(pipeline, PROMPTS, "cpu")
    family.free_text_encoders(pipeline)
    assert pipeline.text_encoder is None and getattr(pipeline, "text_encoder_2", None) is None
    again = family.encode_prompts(pipeline, PROMPTS, "cpu")
    for prompt in PROMPTS:
        assert torch.equal(first[prompt][0], again[prompt][0]) and torch.equal(first[prompt][1], again[prompt][1])
    with pytest.raises(ValueError, match="quantize"):
        family.load(model, "fp8")


def test_a_float16_vae_that_asks_for_upcasting_encodes_in_float32(pipelines):
    """SDXL's VAE overflows in float16 (force_upcast in its config): encode_image runs it in
    float32, as the same weights in a float32 copy do, and leaves it float16 afterwards."""
    import copy
    import types

    vae = copy.deepcopy(pipelines["sdxl"].vae).half()
    vae.register_to_config(force_upcast=True)
    reference_vae = copy.deepcopy(vae).float()
    image = _image(3)
    torch.manual_seed(9)
    latent = sdxl.encode_image(types.SimpleNamespace(vae=vae), image, "cpu")
    pixels = torch.from_numpy(numpy.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.manual_seed(9)
    with torch.no_grad():
        reference = reference_vae.encode(pixels).latent_dist.sample()[0] * vae.config.scaling_factor
    assert vae.dtype == torch.float16 and latent.dtype == torch.float32
    assert torch.allclose(latent, reference, atol=1e-6)
