"""The FLUX.1 math against diffusers' own helpers, and the BFL key mapping both ways."""
import math

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from loralab.core.families.parts import flow
from loralab.core.families.flux.model import load_transformer_file
from loralab.core.families.flux.tiny import write_single_file


def test_pack_and_ids_match_diffusers():
    latents = torch.randn(2, 16, 8, 12)
    packed = flow.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(flow.unpack(packed, 8, 12), latents)
    ours = flow.image_ids(8, 12, "cpu", torch.float32)
    assert torch.equal(ours, FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def test_noise_and_target():
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    noisy, target = flow.noisy_latents(x0, noise, torch.tensor([0.25]))
    assert torch.allclose(noisy, 0.75 * x0 + 0.25 * noise)
    assert torch.allclose(target, noise - x0)


def test_timestep_sampling():
    generator = torch.Generator().manual_seed(0)
    sigmoid = flow.sample_sigmas(4000, "sigmoid", 1024, generator)
    assert 0 < sigmoid.min() and sigmoid.max() < 1 and abs(sigmoid.mean() - 0.5) < 0.02
    generator.manual_seed(0)
    shifted = flow.sample_sigmas(4000, "shift", 1024, generator, shift=3.0)
    assert shifted.mean() > sigmoid.mean() + 0.1  # shift moves training toward high noise
    assert math.isclose(flow.flux_shift_mu(256), 0.5) and math.isclose(flow.flux_shift_mu(4096), 1.15)


def test_latent_normalisation_reads_the_vae_config():
    class Config:
        shift_factor, scaling_factor = 0.1159, 0.3611

    raw = torch.randn(3)
    assert torch.allclose(flow.normalize_latents(raw, Config), 0.3611 * (raw - 0.1159))
    assert torch.allclose(flow.denormalize_latents(flow.normalize_latents(raw, Config), Config), raw)


def test_single_file_transformer_in_bfl_keys(tiny_flux, tmp_path):
    path = write_single_file(tiny_flux, str(tmp_path / "flux-bfl.safetensors"))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
    loaded = load_transformer_file(path, tiny_flux, torch.float32).state_dict()
    original = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").state_dict()
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
