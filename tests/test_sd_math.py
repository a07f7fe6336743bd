"""The SD1.5/SDXL training math (core/families/unet/noise.py, conditioning.py) measured against
diffusers' own DDPMScheduler, compute_snr and UNet."""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from loralab.core.families.sd15 import FAMILY as sd15
from loralab.core.families.unet import conditioning, noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
TIMESTEPS = torch.tensor([0, 1, 250, 500, 998, 999])


def _scheduler(**overrides):
    return DDPMScheduler(**{**SD, **overrides})


@pytest.mark.parametrize("schedule", [SD, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)])
def test_schedule_noisy_latents_and_targets_equal_diffusers(schedule):
    scheduler = DDPMScheduler(**schedule)
    cumulative = noise.alphas_cumprod(dict(scheduler.config))
    assert torch.equal(cumulative, scheduler.alphas_cumprod)
    latents, drawn = torch.randn(6, 4, 5, 7), torch.randn(6, 4, 5, 7)
    assert torch.allclose(noise.noisy_latents(latents, drawn, cumulative, TIMESTEPS),
                          scheduler.add_noise(latents, drawn, TIMESTEPS), atol=1e-6)
    assert torch.allclose(noise.target(latents, drawn, cumulative, TIMESTEPS, "v_prediction"),
                          scheduler.get_velocity(latents, drawn, TIMESTEPS), atol=1e-6)
    assert torch.equal(noise.target(latents, drawn, cumulative, TIMESTEPS, "epsilon"), drawn)
    with pytest.raises(ValueError, match="prediction_type"):
        noise.target(latents, drawn, cumulative, TIMESTEPS, "sample")


def test_zero_terminal_snr_schedule_equals_diffusers_rescale():
    reference = _scheduler(rescale_betas_zero_snr=True).alphas_cumprod
    ours = noise.alphas_cumprod(SD, zero_terminal_snr=True)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-4)
    assert ours[-1] == 0 and torch.allclose(ours[0], _scheduler().alphas_cumprod[0])
    # a scheduler config that asks for it itself gets it without the train option
    assert torch.allclose(noise.alphas_cumprod({**SD, "rescale_betas_zero_snr": True}), reference,
                          atol=1e-6, rtol=1e-4)
    assert not torch.allclose(noise.alphas_cumprod(SD), reference, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_example(prediction_type):
    gamma = 5.0
    scheduler = _scheduler(prediction_type=prediction_type)
    # as diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py weighs its loss
    snr = compute_snr(scheduler, TIMESTEPS)
    reference = torch.stack([snr, gamma * torch.ones_like(TIMESTEPS)], dim=1).min(dim=1)[0]
    reference = reference / snr if prediction_type == "epsilon" else reference / (snr + 1)
    ours = noise.min_snr_weights(noise.snr(noise.alphas_cumprod(SD), TIMESTEPS), gamma, prediction_type)
    assert torch.allclose(ours, reference, rtol=1e-5)
    assert (ours < 1).any() and (ours <= 1 + 1e-6).all()


def test_min_snr_weights_are_finite_at_zero_terminal_snr():
    cumulative = noise.alphas_cumprod(SD, zero_terminal_snr=True)
    snr = noise.snr(cumulative, TIMESTEPS)
    assert snr[-1] == 0
    epsilon = noise.min_snr_weights(snr, 5.0, "epsilon")
    assert torch.isfinite(epsilon).all() and epsilon[-1] == 1  # min(SNR, g)/SNR -> 1 as SNR -> 0
    assert noise.min_snr_weights(snr, 5.0, "v_prediction")[-1] == 0


def test_timesteps_stay_in_the_asked_range():
    generator = torch.Generator().manual_seed(0)
    _, timesteps = noise.draw((4000, 4, 1, 1), generator, 1000, timestep_min=200, timestep_max=300)
    assert timesteps.min() == 200 and timesteps.max() == 299
    _, timesteps = noise.draw((4000, 4, 1, 1), generator, 1000)
    assert timesteps.min() == 0 and timesteps.max() == 999
    for low, high in ((300, 300), (-1, 10), (0, 1001)):
        with pytest.raises(ValueError, match="timestep_min"):
            noise.draw((1, 4, 1, 1), generator, 1000, timestep_min=low, timestep_max=high)


def test_noise_offset_shifts_only_each_channels_mean():
    shape, offset = (64, 4, 32, 32), 0.1
    plain, _ = noise.draw(shape, torch.Generator().manual_seed(3), 1000)
    shifted, _ = noise.draw(shape, torch.Generator().manual_seed(3), 1000, noise_offset=offset)
    difference = shifted - plain
    # one value per sample and channel, the same at every pixel
    assert torch.allclose(difference, difference[:, :, :1, :1].expand(shape), atol=1e-6)
    per_channel = difference[:, :, 0, 0]
    assert abs(per_channel.std().item() - offset) < 0.2 * offset and abs(per_channel.mean()) < 0.03
    # the noise around each channel's mean is unchanged
    assert torch.allclose(shifted - shifted.mean(dim=(2, 3), keepdim=True),
                          plain - plain.mean(dim=(2, 3), keepdim=True), atol=1e-5)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32).eval()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_training_loss_trains_against_the_schedulers_target(prediction_type):
    unet, scheduler = _tiny_unet(), _scheduler(prediction_type=prediction_type)
    unet.loralab_noise_config = dict(scheduler.config)
    latents, text = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    batch = {"latents": latents, "text": text, "pooled": torch.zeros(3, 0)}
    settings = {"noise_offset": 0.05, "min_snr_gamma": 5.0, "timestep_min": 100, "timestep_max": 900}
    with torch.no_grad():
        loss = sd15.training_loss(unet, batch, torch.Generator().manual_seed(7), settings, False)

        # The same draws, in the documented order, made here; then diffusers' own math.
        generator = torch.Generator().manual_seed(7)
        drawn = torch.randn(latents.shape, generator=generator)
        drawn = drawn + 0.05 * torch.randn(3, 4, 1, 1, generator=generator)
        timesteps = torch.randint(100, 900, (3,), generator=generator)
        prediction = unet(scheduler.add_noise(latents, drawn, timesteps), timesteps, text).sample
    velocity = scheduler.get_velocity(latents, drawn, timesteps)
    target = velocity if prediction_type == "v_prediction" else drawn
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, 5.0))
    weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_sample * weights).mean(), rtol=1e-5)
    wrong = drawn if prediction_type == "v_prediction" else velocity
    for other in (-target, wrong):
        assert not torch.allclose(loss, (((prediction - other) ** 2).mean(dim=(1, 2, 3)) * weights).mean(),
                                  rtol=1e-2)
    with torch.no_grad():  # without min-SNR: the plain MSE
        plain = sd15.training_loss(unet, batch, torch.Generator().manual_seed(7),
                                   {**settings, "min_snr_gamma": None}, False)
    assert torch.allclose(plain, per_sample.mean(), rtol=1e-5)


def test_add_time_ids_are_size_crop_target_per_sample():
    ids = conditioning.add_time_ids(torch.tensor([[300, 200], [64, 64]]), torch.tensor([[10, 0], [0, 4]]), (64, 32))
    assert ids.tolist() == [[300, 200, 10, 0, 64, 32], [64, 64, 0, 4, 64, 32]]
