"""The plan of a run: the guide's formulas, each advice rule on a dataset made to trigger it and
on one made not to, and the memory estimate checked against real module shapes."""
import random
import re

import pytest
from PIL import Image

from conftest import run_cli
from loralab.core.coach.advice import advise
from loralab.core.coach.plan import plan_dataset, plan_report
from loralab.core.config import with_defaults
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.flux.memory import FLUX_DEV, model_shape
from loralab.core.memory import estimate_memory, state_bytes
from loralab.core.config import resolve
from loralab.core.dataset import scan_folder


def make_images(folder, sizes, captions=True, seed=0):
    """One distinct image per size (random 8x8 colour blocks, scaled up), with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index, (width, height) in enumerate(sizes):
        blocks = Image.new("RGB", (8, 8))
        blocks.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64)])
        blocks.resize((width, height), Image.Resampling.NEAREST).save(folder / f"img_{index:03d}.png")
        if captions:
            (folder / f"img_{index:03d}.txt").write_text(f"a photo of [trigger], pattern {index}")
    return str(folder)


def rules(folder, **sections):
    """{rule: Advice} for the folder with these settings (training resolution 512 unless given)."""
    sections.setdefault("dataset", {}).setdefault("resolution", [512])
    return {a.rule: a for a in advise(scan_folder(folder), with_defaults(sections))}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """20 captioned, distinct, same-size images: no dataset rule should fire."""
    return make_images(tmp_path_factory.mktemp("good"), [(512, 512)] * 20)


@pytest.fixture(scope="module")
def thirty(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("thirty"), [(32, 32)] * 30)


def test_guides_worked_example(thirty):
    numbers = plan_dataset(thirty, {"train": {"steps": 1800}}).run.numbers()
    assert (numbers["images"], numbers["steps_per_epoch"], numbers["epochs"]) == (30, 30, 60)
    plan = plan_dataset(thirty, {"train": {"steps": 1800}, "dataset": {"repeats": 2}})
    assert (plan.run.numbers()["steps_per_epoch"], plan.run.numbers()["epochs"]) == (60, 30)
    assert "steps per epoch = 30 images x 2 repeats / batch 1 = 60; epochs = 1800 / 60 = 30" in plan_report(plan)


def test_recommended_steps_when_none_given(good):
    plan = plan_dataset(good, {})
    assert not plan.run.steps_given and plan.band == (1000, 1500) and 1000 <= plan.run.steps <= 1500
    assert "recommended for this dataset size" in plan_report(plan)


def test_default_settings_on_a_good_dataset_give_no_advice(good):
    assert rules(good) == {}
    assert "advice: none" in plan_report(good, {"dataset": {"resolution": [512]}})


def test_few_images(tmp_path, good):
    few = make_images(tmp_path / "few", [(64, 64)] * 6)
    assert "15-20" in rules(few)["few_images"].message
    assert "few_images" not in rules(good)


def test_missing_captions(tmp_path, good):
    folder = make_images(tmp_path / "d", [(64, 64)] * 3, captions=False)
    advice = rules(folder)["missing_captions"]
    assert advice.level == "note" and "img_000.png" in advice.message
    assert "missing_captions" not in rules(good)
    assert "captions missing: 3" in plan_report(folder)


def test_skipped_images_say_why(tmp_path, good):
    folder = make_images(tmp_path / "d", [(64, 64)] * 3)
    (tmp_path / "d" / "broken.png").write_bytes(b"not an image")
    assert "broken.png: cannot be read" in rules(folder)["skipped_images"].message
    assert "skipped broken.png: cannot be read" in plan_report(folder)
    assert "skipped_images" not in rules(good)


def test_inconsistent_resolutions(tmp_path, good):
    folder = make_images(tmp_path / "d", [(64, 64), (64, 64), (256, 192)])
    assert "from 64x64 to 256x192" in rules(folder)["inconsistent_resolutions"].message
    assert "inconsistent_resolutions" not in rules(good)


def test_images_below_training_resolution(good):
    advice = rules(good, dataset={"resolution": [512, 1024]})["below_resolution"]
    assert "smaller than the training resolution 1024" in advice.message
    assert "below_resolution" not in rules(good, dataset={"resolution": [512]})


def test_resolution_outside_the_guides_band(good):
    assert rules(good, dataset={"resolution": [256]})["resolution_band"].level == "note"
    assert "resolution_band" not in rules(good, dataset={"resolution": [512, 768, 1024]})


def test_near_duplicates(tmp_path, good):
    folder = make_images(tmp_path / "d", [(64, 64)] * 3)
    with Image.open(f"{folder}/img_001.png") as image:  # resized and recompressed copy
        image.resize((80, 80), Image.Resampling.BILINEAR).save(f"{folder}/copy.jpg", quality=70)
    assert "copy.jpg ~ img_001.png" in rules(folder)["near_duplicates"].message
    assert "near_duplicates" not in rules(good)


def test_near_duplicates_ignore_flat_images_of_different_colours(tmp_path):
    tmp_path.joinpath("d").mkdir()
    for index, colour in enumerate(["red", "navy", "white"]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "d" / f"{index}.png")
    assert "near_duplicates" not in rules(str(tmp_path / "d"))


@pytest.mark.parametrize("lr, optimizer, fires", [
    (1e-4, "adamw8bit", False), (8e-4, "adamw8bit", False), (5e-5, "adamw8bit", True),
    (1e-3, "adamw", True), (0.0, "adamw8bit", True), (1.0, "prodigy", False), (1e-4, "prodigy", True)])
def test_learning_rate_band(good, lr, optimizer, fires):
    advice = rules(good, train={"lr": lr, "optimizer": optimizer}).get("lr_band")
    assert (advice is not None) == fires
    if lr == 0:
        assert "will not learn" in advice.message


@pytest.mark.parametrize("rank, level", [(16, None), (32, None), (8, "note"), (2, "warning"), (64, "warning")])
def test_rank_band(good, rank, level):
    advice = rules(good, network={"linear": rank}).get("rank_band")
    assert (advice.level if advice else None) == level


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_rank_band_is_the_guides_for_lora_only(good, kind):
    """A LoKr's rank is a factor's, a LoHa's is squared: the LoRA bands would mislead there."""
    assert "rank_band" not in rules(good, network={"type": kind, "linear": 2})
    assert rules(good, network={"type": "lora", "linear": 2})["rank_band"].level == "warning"


def test_batch_size_above_one_repeats_the_guides_reasons(good):
    message = rules(good, train={"batch_size": 4})["batch_size"].message
    for reason in ("less stably", "fine detail", "memory"):
        assert reason in message
    assert "batch_size" not in rules(good, train={"batch_size": 1})


def test_repeats_above_one(good):
    assert "repeats" in rules(good, dataset={"repeats": 3})
    assert "repeats" not in rules(good, dataset={"repeats": 1})


@pytest.mark.parametrize("steps, fires", [(None, False), (1200, False), (500, True), (3000, True)])
def test_steps_outside_the_guides_band(good, steps, fires):
    assert ("steps_band" in rules(good, train={"steps": steps})) == fires


def test_lora_parameters_match_the_real_flux_dev_modules():
    """Count the linears LORA_TARGETS selects in a FLUX.1-dev-shaped transformer built on the
    meta device (no memory, no download)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from loralab.core.families.flux import LORA_TARGETS

    with init_empty_weights():
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, name))
    assert flux.memory.lora_parameters(FLUX_DEV, {"linear": 1}) == per_rank
    assert sum(p.numel() for p in model.parameters()) == FLUX_DEV["parameters"]


def test_lora_parameters_match_an_injected_lora(tiny_flux):
    from diffusers import FluxTransformer2DModel

    from loralab.core.families.flux import LORA_TARGETS
    from loralab.core.lora import add_lora

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    parameters = add_lora(transformer, 8, 8, LORA_TARGETS)
    shape, source = model_shape(tiny_flux)
    assert flux.memory.lora_parameters(shape, {"linear": 8}) == sum(p.numel() for p in parameters)
    assert shape["parameters"] == sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)


def test_memory_grows_with_rank_and_optimizer_states():
    def total(**sections):
        return estimate_memory(with_defaults({"model": {"path": "not/here"}, **sections}))

    rank16 = total(network={"linear": 16})
    assert rank16.lora_parameters == 16 * 4_085_760 and "FLUX.1-dev" in rank16.model_source
    assert total(network={"linear": 32}).lora_bytes == 2 * rank16.lora_bytes
    by_optimizer = {name: total(train={"optimizer": name}).lora_bytes
                    for name in ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")}
    assert by_optimizer["prodigy"] > by_optimizer["adamw"] > by_optimizer["adamw8bit"] > by_optimizer["lion"]
    assert by_optimizer["adafactor"] < by_optimizer["adamw8bit"]
    assert total(model={"quantize": "nf4"}).base_bytes < total().base_bytes < total(model={"dtype": "fp32"}).base_bytes
    assert "GiB" in rank16.describe()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "prodigy", "adafactor", "lion"])
def test_optimizer_state_bytes_match_the_optimizers(optimizer):
    """Step the real optimizer on a rank-16 LoRA pair and weigh its state tensors."""
    import torch

    from loralab.core.trainer.optimizers import make_optimizer

    parameters = [torch.nn.Parameter(torch.randn(16, 3072)), torch.nn.Parameter(torch.randn(3072, 16))]
    step = make_optimizer(optimizer, parameters, 1e-4)
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    step.step()
    weighed = sum(t.numel() * t.element_size() for state in step.state.values()
                  for t in state.values() if torch.is_tensor(t))
    assert weighed / sum(p.numel() for p in parameters) == pytest.approx(state_bytes(optimizer, 16), rel=0.1)


def test_plan_command(good):
    result = run_cli("plan", good, "--steps", "3000", "--batch-size", "2", "--linear", "64",
                     "--lr", "1e-3", "--optimizer", "adamw", "--resolution", "512")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "images: 20 found, 0 skipped" in out and "steps per epoch = 20 images x 1 repeats / batch 2 = 10" in out
    assert "epochs = 3000 / 10 = 300" in out and "memory (estimate): LoRA rank 64" in out
    for rule in ("train.lr = 0.001", "network.linear (rank) = 64", "train.batch_size = 2", "train.steps = 3000"):
        assert rule in out


def test_plan_command_on_a_missing_folder(tmp_path):
    result = run_cli("plan", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "dataset folder not found" in result.stderr


@pytest.mark.parametrize("family, vram, checkpointing", [("sdxl", 24, "on"), ("sdxl", 80, "off"),
                                                         ("sd15", 8, "on"), ("sd15", 24, "off")])
def test_the_unet_families_plan_unquantized_with_checkpointing_by_gpu_size(family, vram, checkpointing):
    from loralab.core.memory import DoesNotFit, fit_report, resolve_memory_settings

    config = resolve({"model": {"path": f"builtin:tiny-{family}"}, "dataset": {"folder": "-"}})
    assert config["model"]["family"] == family
    report = fit_report(config, vram * 2**30)
    assert f"{family} trains unquantized" in report and f"gradient checkpointing {checkpointing}" in report
    assert resolve_memory_settings(config, vram * 2**30, "cuda")[:2] == ("none", checkpointing == "on")
    with pytest.raises(DoesNotFit, match=f"model.quantize fp8: model.family {family} offers none"):
        resolve_memory_settings({**config, "model": {**config["model"], "quantize": "fp8"}}, 2**34, "cuda")
