"""FLUX.1 flow-matching math (docs/architecture.md, "Flux training math"): latent normalisation,
2x2 packing, position ids, noise levels, noisy input and target."""
import math

import torch



def normalize_latents(vae_latents, vae_config):
    # z = scaling_factor * (latent - shift_factor); both come from the VAE config (0.3611, 0.1159).
    return (vae_latents - vae_config.shift_factor) * vae_config.scaling_factor


def denormalize_latents(latents, vae_config):
    return latents / vae_config.scaling_factor + vae_config.shift_factor


def pack(latents):
    """b c (h 2) (w 2) -> b (h w) (c 2 2): each 2x2 latent patch becomes one token."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens, height, width):
    """The inverse of pack for a latent of height x width."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    patches = tokens.view(batch, height // 2, width // 2, channels, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_ids(latent_height, latent_width, device, dtype):
    """(h/2 * w/2, 3) position ids: row index in channel 1, column index in channel 2."""
    ids = torch.zeros(latent_height // 2, latent_width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(latent_height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(latent_width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(sequence_length, device, dtype):
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def flux_shift_mu(num_tokens, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15):
    """mu rises linearly from 0.5 at 256 image tokens to 1.15 at 4096 (FLUX.1's resolution shift)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens - base_tokens)


def sample_sigmas(batch_size, timestep_type, num_tokens, generator, shift=3.0):
    """Noise levels s in (0, 1) for one batch. sigmoid: s = sigmoid(N(0, 1)) (ai-toolkit's
    default); shift: s' = k s / (1 + (k - 1) s); flux_shift: the same shift with k = e^mu(tokens)."""
    sigmas = torch.sigmoid(torch.randn(batch_size, generator=generator))
    if timestep_type == "shift":
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    elif timestep_type == "flux_shift":
        k = math.exp(flux_shift_mu(num_tokens))
        sigmas = k * sigmas / (1 + (k - 1) * sigmas)
    return sigmas


def noisy_latents(latents, noise, sigmas):
    """x_t = (1 - s) x0 + s eps; the model learns the velocity eps - x0."""
    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents
