"""DDPM training math for the UNet families (SD1.5, SDXL): the noise schedule, timesteps, noise
(with kohya's noise offset), the noisy latents, the epsilon or v target, min-SNR weights and
the per-sample weighted MSE. Every random draw comes from the CPU generator passed in."""
import torch


def alphas_cumprod(scheduler_config, zero_terminal_snr=False):
    """alpha-bar_t for t = 0 .. T-1 (float32), from a diffusers scheduler config: its betas,
    beta_schedule and num_train_timesteps. `zero_terminal_snr` (or the config's own
    rescale_betas_zero_snr) rescales it so the last step is pure noise (Lin et al. 2023, alg. 1)."""
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 0.0001), scheduler_config.get("beta_end", 0.02)
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    elif schedule == "scaled_linear":  # SD1.5 and SDXL: linear in sqrt(beta)
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"the scheduler's beta_schedule {schedule!r} is not supported for "
                         "training (linear and scaled_linear are)")
    cumulative = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr or scheduler_config.get("rescale_betas_zero_snr", False):
        # Shift sqrt(alpha-bar) so the last step is 0, then scale so the first is unchanged.
        root = cumulative.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        cumulative = ((root - last) * first / (first - last)) ** 2
    return cumulative


def draw(shape, generator, num_train_timesteps, noise_offset=0.0, timestep_min=0, timestep_max=None):
    """(noise, timesteps) for a batch of latents of `shape` [B, C, h, w], drawn in this order:
    the noise; kohya's noise offset, one value per sample and channel (changes only each
    channel's mean, so the model can learn darker and brighter images); the integer timesteps,
    uniform in [timestep_min, timestep_max)."""
    timestep_max = num_train_timesteps if timestep_max is None else timestep_max
    if not 0 <= timestep_min < timestep_max <= num_train_timesteps:
        raise ValueError(f"train.timestep_min {timestep_min} and timestep_max {timestep_max} must "
                         f"satisfy 0 <= min < max <= {num_train_timesteps}")
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    timesteps = torch.randint(timestep_min, timestep_max, (shape[0],), generator=generator)
    return noise, timesteps


def _at(values, timesteps, like):
    """values[t] per sample, shaped to broadcast over a [B, ...] tensor like `like`."""
    picked = values.to(like.device, like.dtype)[timesteps.to(like.device)]
    return picked.view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(latents, noise, cumulative, timesteps):
    """x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise."""
    alpha_bar = _at(cumulative, timesteps, latents)
    return alpha_bar ** 0.5 * latents + (1 - alpha_bar) ** 0.5 * noise


def target(latents, noise, cumulative, timesteps, prediction_type):
    """What the UNet learns to predict: the noise (epsilon) or v = sqrt(ab) noise - sqrt(1-ab) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = _at(cumulative, timesteps, latents)
        return alpha_bar ** 0.5 * noise - (1 - alpha_bar) ** 0.5 * latents
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


def snr(cumulative, timesteps):
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) at each timestep (0 at a zero-SNR end)."""
    alpha_bar = cumulative[timesteps.cpu()].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values, gamma, prediction_type):
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for
    epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction. The epsilon form is written as
    min(1, gamma / SNR), which is 1 rather than 0/0 where the SNR is 0."""
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return torch.minimum(snr_values, torch.full_like(snr_values, gamma)) / (snr_values + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
