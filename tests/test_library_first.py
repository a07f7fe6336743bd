"""The parts LoRA Lab leaves to its libraries, checked against those libraries: the learning-rate
schedules against diffusers' get_scheduler, strengths against diffusers' own set_adapters on the
saved file, gradient accumulation under two processes against one process, and the kohya file
against diffusers' kohya loader."""
import io
import json

import numpy
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.optimization import get_scheduler
from conftest import torchrun
from safetensors.torch import load_file
from test_lora_file import transformer_output

from loralab.core.config import resolve
from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.flux import keys
from loralab.core.lora import add_lora, lora_weights, read_lora_file
from loralab.core.runs import RunFolder
from loralab.core.sampling import strength_grid
from loralab.core.trainer import train, write_lora

# -- learning-rate schedules ------------------------------------------------------------------------

STEPS, WARMUP, LR = 8, 3, 1e-3


def reference_rates(name):
    """The rate of each of STEPS updates, from diffusers' get_scheduler on its own optimizer."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    rates = []
    for _ in range(STEPS):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_each_step_trains_at_get_schedulers_rate_across_a_resume(name, resolved):
    config = resolved(name=f"lr_{name}", train={"steps": STEPS, "lr": LR, "lr_scheduler": name,
                                                "lr_warmup_steps": WARMUP},
                      logging={"performance_log_every": 1})
    rates = {}

    def record(event):
        if event["type"] == "step":
            rates[event["step"]] = event["lr"]

    first = train(config, on_event=record, should_stop=lambda: len(rates) == 4)
    assert first.status == "interrupted" and first.step == 4
    assert train(config, on_event=record).status == "finished"  # resumes the schedule's state
    expected = reference_rates(name)
    assert [rates[step] for step in range(1, STEPS + 1)] == pytest.approx(expected, rel=1e-9, abs=0)
    metrics = RunFolder(config["save"]["output_dir"], config["name"]).read_metrics()
    assert [m["lr"] for m in metrics] == pytest.approx(expected, rel=1e-9, abs=0)
    if name == "constant":  # diffusers' meaning: no warm-up, whatever lr_warmup_steps says
        assert expected == [LR] * STEPS


# -- LoRA strength while sampling -------------------------------------------------------------------

def random_lora(transformer, rank, alpha, seed=0):
    """Float32 peft weights of a LoRA on LORA_TARGETS with every matrix random (peft starts B at 0)."""
    add_lora(transformer, rank, alpha, flux.LORA_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.3
               for k, v in lora_weights(transformer).items()}
    transformer.unload_lora()
    return weights


def lora_config(rank, alpha, fmt="diffusers"):
    return {"name": "random", "model": {"family": "flux"}, "network": {"linear": rank, "linear_alpha": alpha},
            "save": {"format": fmt, "dtype": "float32"}}


def test_sampling_at_a_strength_is_diffusers_set_adapters_on_the_saved_file(tiny_flux, tmp_path):
    ours = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    weights = random_lora(ours.transformer, 4, 8)
    path = write_lora(str(tmp_path / "lora.safetensors"), weights, lora_config(4, 8), 1)
    strengths, prompt = [0.0, 0.5, 1.0, 1.5], "a photo of sks"
    sample = {"seed": 3, "sample_steps": 2, "guidance_scale": 3.5, "width": 64, "height": 64}
    _, images = strength_grid(flux, ours, [prompt], strengths, sample, "cpu",
                              lora={"weights": weights, "network": {"linear": 4, "linear_alpha": 8}})

    reference = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    reference.load_lora_weights(path, adapter_name="saved")
    for strength in strengths:
        reference.set_adapters(["saved"], [strength])
        expected = reference(prompt, num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
                             max_sequence_length=flux.text_length(reference),
                             generator=torch.Generator().manual_seed(3), output_type="np").images[0]
        got = numpy.asarray(images[strength][0], dtype=numpy.float32) / 255
        assert numpy.abs(got - expected).max() <= 1.5 / 255, strength  # PIL rounds to 8 bits
    assert numpy.abs(numpy.asarray(images[1.5][0], float) - numpy.asarray(images[0.0][0], float)).mean() > 1
    assert not getattr(ours.transformer, "peft_config", None)  # the grid leaves no LoRA behind


# -- gradient accumulation: two processes = one process with twice the micro-steps ----------------

def test_accumulation_on_two_processes_equals_one_process_with_twice_the_micro_steps(make_config, tmp_path):
    common = {"train": {"steps": 3, "lr": 1e-3}, "save": {"dtype": "float32", "save_every": 100},
              "logging": {"performance_log_every": 1}}
    two = make_config(name="two", **{**common, "train": {**common["train"], "gradient_accumulation_steps": 2}})
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two))
    done = torchrun("-m", "loralab.cli", "train", path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = resolve(make_config(name="one", **{**common, "train": {**common["train"],
                                                                  "gradient_accumulation_steps": 4}}))
    assert train(one).status == "finished"

    runs = [RunFolder(resolve(two)["save"]["output_dir"], "two"), RunFolder(one["save"]["output_dir"], "one")]
    # the same images, noise and captions per update: the same loss; the same summed gradient
    # (its norm before clipping), so the same weights
    (two_metrics, one_metrics) = [run.read_metrics() for run in runs]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in two_metrics] == pytest.approx([m[key] for m in one_metrics], rel=1e-4), key
    two_lora, one_lora = [load_file(run.final_lora) for run in runs]
    assert set(two_lora) == set(one_lora)
    for key in one_lora:
        assert torch.allclose(two_lora[key], one_lora[key], atol=1e-5), key


# -- the kohya file in diffusers ----------------------------------------------------------------------

def test_kohya_metadata_says_the_scale_the_alpha_tensors_say(tiny_flux, tmp_path):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    weights = random_lora(transformer, 4, 16)
    path = write_lora(str(tmp_path / "kohya.safetensors"), weights, lora_config(4, 16, "kohya"), 1,
                      to_kohya=flux.lora_to_kohya(transformer))
    tensors, metadata = read_lora_file(path)
    claimed = float(metadata["ss_network_alpha"]) / float(metadata["ss_network_dim"])
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert alphas
    for key in alphas:
        rank = tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]
        assert tensors[key].item() / rank == claimed, key
    assert metadata["loralab_network_alpha"] == "16"  # the alpha it was trained with


def test_the_kohya_file_loads_in_diffusers_as_the_diffusers_file(tiny_flux, tmp_path):
    # diffusers' kohya reader splits single blocks' linear1 at FLUX.1's widths (3072, 12288), so
    # the tiny model here has double blocks only; the next test covers linear1 at FLUX.1's width.
    config = FluxTransformer2DModel.load_config(tiny_flux, subfolder="transformer")
    transformer = FluxTransformer2DModel.from_config({**config, "num_single_layers": 0})
    pipeline = FluxPipeline.from_pretrained(tiny_flux, transformer=transformer, local_files_only=True)
    weights = random_lora(transformer, 4, 8)
    paths = {fmt: write_lora(str(tmp_path / f"{fmt}.safetensors"), weights, lora_config(4, 8, fmt), 1,
                             to_kohya=flux.lora_to_kohya(transformer)) for fmt in ("diffusers", "kohya")}
    base = transformer_output(transformer)
    outputs = {}
    for fmt, path in paths.items():
        pipeline.load_lora_weights(path, adapter_name=fmt)
    for fmt in paths:
        pipeline.set_adapters([fmt], [1.0])
        outputs[fmt] = transformer_output(transformer)
    assert not torch.allclose(outputs["diffusers"], base, atol=1e-3)
    assert torch.allclose(outputs["kohya"], outputs["diffusers"], atol=1e-5)


def test_kohya_single_blocks_at_flux_width_read_back_as_the_same_lora(tmp_path):
    rank, hidden, mlp = 4, 3072, 12288  # FLUX.1's: what diffusers' kohya reader splits linear1 at
    generator = torch.Generator().manual_seed(0)
    shapes = {"attn.to_q": (hidden, hidden), "attn.to_k": (hidden, hidden), "attn.to_v": (hidden, hidden),
              "proj_mlp": (hidden, mlp), "proj_out": (hidden + mlp, hidden)}
    weights = {}
    for module, (inputs, outputs) in shapes.items():
        name = f"single_transformer_blocks.0.{module}"
        weights[f"{name}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator)
        weights[f"{name}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator)
    kohya = write_lora(str(tmp_path / "kohya.safetensors"), weights, lora_config(rank, 8, "kohya"), 1,
                       to_kohya=lambda baked: keys.lora_to_kohya(baked, 0, 1))
    read = FluxPipeline.lora_state_dict(kohya)
    read = read[0] if isinstance(read, tuple) else read
    for module in shapes:
        name = f"transformer.single_transformer_blocks.0.{module}"
        delta = read[f"{name}.lora_B.weight"] @ read[f"{name}.lora_A.weight"]
        trained = weights[f"{name[12:]}.lora_B.weight"] @ weights[f"{name[12:]}.lora_A.weight"] * 2
        assert torch.allclose(delta, trained, rtol=1e-4, atol=1e-3), module


# -- the CLI's progress --------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


EVENTS = [{"type": "start", "step": 2, "steps": 6}, {"type": "step", "step": 3, "steps": 6, "loss": 0.5},
          {"type": "checkpoint", "path": "a.safetensors"},
          {"type": "step", "step": 4, "steps": 6, "loss": 0.25},
          {"type": "done", "status": "finished", "path": "final.safetensors"}]


def test_progress_is_tqdms_bar_on_a_terminal_and_plain_lines_in_a_log():
    from loralab.cli import Progress

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(stream)
        for event in EVENTS:
            progress(event)
    shown = terminal.getvalue()
    assert "4/6" in shown and "loss=0.2500" in shown and ("step/s" in shown or "s/step" in shown)
    assert shown.rstrip().endswith("finished: final.safetensors")
    assert log.getvalue() == ("training steps 3..6\nsaved a.safetensors\nfinished: final.safetensors\n")
