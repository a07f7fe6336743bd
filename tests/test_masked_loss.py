"""Masked loss (dataset.mask_folder, alpha_mask, mask_min): a LoRA trained with a mask over one half
of each picture changes the loss of that half far more than the other's (the LoRA file loaded by
diffusers, at fixed noise); each latent cell's error weighs what its
mask says (against torch's own MSE of the masked cells), an all-black mask trains nothing at
mask_min 0, an image's alpha is the same mask as a mask file, and a mask that is missing, of
another size or absent (no alpha) is named before any model loads."""
import os

import pytest
import torch
from PIL import Image
from diffusers import FluxPipeline

from loralab.core.config import resolve
from loralab.core.dataset import DatasetError, scan_folder
from loralab.core.families.builtin import resolve_model_path
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.parts import flow
from loralab.core.families.loss import loss_mask, weighted_mse
from loralab.core.trainer import train

from test_preservation import guidance
from test_regularization import latents_of

pytestmark = pytest.mark.usefixtures("one_thread")


def half_masks(dataset, folder, side="left", size=None):
    """A mask per image of `dataset`: white on its `side` half, black on the other (None: all black)."""
    os.makedirs(folder, exist_ok=True)
    for item in scan_folder(dataset, "txt", "").items:
        width, height = size or (item.width, item.height)
        mask = Image.new("L", (width, height), 0)
        if side:
            mask.paste(255, (0, 0, width // 2, height) if side == "left" else (width // 2, 0, width, height))
        mask.save(os.path.join(folder, os.path.splitext(os.path.basename(item.path))[0] + ".png"))
    return folder


SIGMAS = (0.1, 0.5, 0.9)  # fixed noise levels (4 draws of noise each) the loss is measured at


def _loss_of_halves(pipeline, latents, text, pooled):
    """(left, right): the flow-matching MSE of each half of the latents, over SIGMAS."""
    height, width = latents.shape[2:]
    generator, left, right = torch.Generator().manual_seed(1), 0.0, 0.0
    for sigma in SIGMAS:
        for _ in range(4):
            sigmas = torch.full((len(latents),), sigma)
            noisy, target = flow.noisy_latents(latents, torch.randn(latents.shape, generator=generator), sigmas)
            with torch.no_grad():
                packed = flux.predict(pipeline.transformer, flow.pack(noisy), sigmas, text, pooled,
                                      height, width, guidance(pipeline))
            error = (flow.unpack(packed, height, width) - target).pow(2)
            left, right = left + error[..., : width // 2].mean().item(), right + error[..., width // 2:].mean().item()
    return left / (4 * len(SIGMAS)), right / (4 * len(SIGMAS))


def test_a_lora_changes_its_masked_halfs_loss_far_more(make_config, demo_dataset, tmp_path):
    """Measured (120 steps at lr 4e-3): left mask, the left half's loss 1.14 -> 0.46, the right's
    1.02 -> 0.72 (2.3x the change); right mask, right 1.02 -> 0.49, left 1.14 -> 0.75 (1.3x)."""
    # the shapes model (pretrained on pictures like the demo's): a random one learns mostly
    # denoising in general, alike on both halves
    pipeline = FluxPipeline.from_pretrained(resolve_model_path("builtin:tiny-flux"), local_files_only=True)
    items = scan_folder(demo_dataset, "txt", "sks").items
    latents = latents_of(pipeline, [Image.open(item.path) for item in items])
    encoded = flux.encode_prompts(pipeline, [item.caption for item in items], "cpu")
    text, pooled = (torch.stack([encoded[item.caption][i] for item in items]) for i in (0, 1))
    base, trained = _loss_of_halves(pipeline, latents, text, pooled), {}
    for side in ("left", "right"):
        result = train(resolve(make_config(
            name=side, model={"path": "builtin:tiny-flux"}, train={"steps": 120, "lr": 4e-3, "timestep_type": "shift"},
            save={"dtype": "float32"}, dataset={"mask_folder": half_masks(demo_dataset, str(tmp_path / side), side),
                                                "mask_min": 0.0, "caption_dropout_rate": 0.0})))
        pipeline.load_lora_weights(result.lora_path, adapter_name=side)
        trained[side] = _loss_of_halves(pipeline, latents, text, pooled)
        pipeline.unload_lora_weights()
    for side, masked, other in (("left", 0, "right"), ("right", 1, "left")):
        change = [base[i] - trained[side][i] for i in (0, 1)]
        assert change[masked] > 1.2 * abs(change[1 - masked]), (side, base, trained)
        # what is left of both LoRAs' shared learning (denoising these pictures at all): each is
        # well below the other on its own half
        assert trained[side][masked] < 0.8 * trained[other][masked], (side, base, trained)


def test_the_mask_weighs_each_latent_cell_as_torch_computes_it():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 6, 8, generator=generator), torch.randn(2, 4, 6, 8, generator=generator)
    left = torch.zeros(2, 1, 6, 8)
    left[..., :4] = 1
    masked = weighted_mse(flow.pack(prediction), flow.pack(target),  # as FLUX lays out its tokens
                          mask=loss_mask({"loss_mask": left}, target, flow.pack))
    by_hand = torch.nn.functional.mse_loss(prediction[..., :4], target[..., :4]) / 2  # half the cells count
    assert masked.item() == pytest.approx(by_hand.item())
    assert weighted_mse(prediction, target, mask=loss_mask({"loss_mask": left}, target)).item() == \
        pytest.approx(by_hand.item())


def _lora_b_size(result):
    return max(v.abs().max().item() for k, v in result.weights.items() if ".lora_B." in k)


def test_a_black_mask_trains_nothing_and_mask_min_trains_it_again(make_config, demo_dataset, tmp_path):
    black = half_masks(demo_dataset, str(tmp_path / "black"), side=None)
    runs = {low: train(resolve(make_config(name=f"min{low}", train={"steps": 3},
                                           dataset={"mask_folder": black, "mask_min": low})))
            for low in (0.0, 0.1)}
    assert _lora_b_size(runs[0.0]) == 0.0  # every latent cell weighs 0: no gradient at all
    assert _lora_b_size(runs[0.1]) > 0.0


def test_the_alpha_channel_is_the_same_mask_as_a_mask_file(make_config, demo_dataset, tmp_path):
    """The pictures saved with their half mask as alpha, against the mask folder: the same LoRA."""
    masks = half_masks(demo_dataset, str(tmp_path / "masks"))
    with_alpha = str(tmp_path / "alpha")
    os.makedirs(with_alpha)
    for item in scan_folder(demo_dataset, "txt", "").items:
        name = os.path.splitext(os.path.basename(item.path))[0]
        image = Image.open(item.path).convert("RGBA")
        image.putalpha(Image.open(os.path.join(masks, name + ".png")))
        image.save(os.path.join(with_alpha, name + ".png"))
        with open(os.path.join(with_alpha, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(item.caption)
    # transparency is composited on white for training: without alpha_mask, the same RGB
    alpha = train(resolve(make_config(name="alpha", train={"steps": 3},
                                      dataset={"folder": with_alpha, "alpha_mask": True})))
    folder = train(resolve(make_config(name="folder", train={"steps": 3},
                                       dataset={"folder": with_alpha, "mask_folder": masks})))
    plain = train(resolve(make_config(name="plain", train={"steps": 3}, dataset={"folder": with_alpha})))
    assert all(torch.equal(alpha.weights[k], folder.weights[k]) for k in alpha.weights)
    assert not all(torch.equal(plain.weights[k], folder.weights[k]) for k in plain.weights)


def test_a_missing_or_misfit_mask_is_named(make_config, demo_dataset, tmp_path):
    masks = half_masks(demo_dataset, str(tmp_path / "small"), size=(16, 16))
    with pytest.raises(DatasetError) as error:
        train(resolve(make_config(train={"steps": 1}, dataset={"mask_folder": masks})))
    assert masks in str(error.value) and "16x16" in str(error.value)
    os.remove(os.path.join(masks, sorted(os.listdir(masks))[0]))
    with pytest.raises(DatasetError) as error:
        train(resolve(make_config(train={"steps": 1}, dataset={"mask_folder": masks})))
    assert "holds no mask for" in str(error.value) and "dataset.mask_folder" in str(error.value)
    with pytest.raises(DatasetError) as error:
        train(resolve(make_config(train={"steps": 1}, dataset={"alpha_mask": True})))
    assert "no alpha channel" in str(error.value)
    assert not os.path.exists(make_config()["save"]["output_dir"])  # named before a run folder


def test_a_changed_mask_starts_a_new_run_folder(make_config, demo_dataset, tmp_path):
    masks = half_masks(demo_dataset, str(tmp_path / "masks"))
    raw = make_config(train={"steps": 2}, dataset={"mask_folder": masks})
    first = train(resolve(raw))
    assert train(resolve(raw)).status == "already finished"
    half_masks(demo_dataset, masks, side="right")
    again = train(resolve(raw))
    assert again.status == "finished" and again.run_folder != first.run_folder
