"""Every precision pair samples before, during and after training, through the nodes as ComfyUI
calls them (TrainLoRA, then SampleGrid on the same base model); the shipped defaults train and
sample as a user gets them (`loralab train` as a subprocess); a node failure is one line."""
import itertools
import json
import os

import pytest
import torch
from PIL import Image

from loralab.core.config import defaults
from loralab.nodes.errors import NodeError

from conftest import run_cli
from test_nodes import call, widget_defaults

DTYPES = ["bf16", "fp16", "fp32"]
# fp16 weights under bf16 autocast: torch's CPU autocast refuses it (see core/trainer/precision.py)
UNSUPPORTED_ON_CPU = {("fp16", "bf16")}


@pytest.mark.parametrize("model_dtype,train_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_every_precision_pair_samples_before_during_and_after_training(
        model_dtype, train_dtype, tiny_flux, demo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype=model_dtype,
                 quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **{
        **widget_defaults("LoRALabConfigureLoRA"), "steps": 2, "optimizer": "adamw",
        "train_dtype": train_dtype, "sample_every": 1, "sample_width": 64, "sample_height": 64,
        "sample_steps": 2})
    if (model_dtype, train_dtype) in UNSUPPORTED_ON_CPU and not torch.cuda.is_available():
        with pytest.raises(NodeError) as error:
            call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config, name="p",
                 resume=True)
        message = str(error.value)
        assert "\n" not in message and "TrainLoRA" in message and "not supported on a CPU" in message
        assert 'model.dtype "bf16"' in message
        return
    lora, _, summary = call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config,
                            name="p", resume=True)
    assert lora.status == "finished"
    assert "memory: on the cpu: model.quantize none, gradient checkpointing" in summary
    samples = tmp_path / "output" / "p" / "samples"
    assert sorted(int(name) for name in os.listdir(samples)) == [0, 1, 2]
    for step_folder in samples.iterdir():
        image = Image.open(next(step_folder.iterdir()))
        assert image.size == (64, 64)
    pipeline = base.pipeline()
    # the training wrapper is gone: ComfyUI's later nodes get the model's own forward
    assert "forward" not in vars(pipeline.transformer)
    assert "_original_forward" not in vars(pipeline.transformer)
    # T5 and CLIP were freed after the captions were encoded, not parked in RAM ...
    assert pipeline.text_encoder is None and pipeline.text_encoder_2 is None
    grid, = call("LoRALabSampleGrid", base_model=base, lora=lora, prompts="a photo of sks",
                 strengths="0,1", seed=1, steps=2, guidance=4.0, width=64, height=64)
    assert grid.shape[0] == 1 and torch.isfinite(grid).all()
    # ... and SampleGrid loaded them again for its prompts, then freed them too
    assert pipeline.text_encoder is None and pipeline.text_encoder_2 is None


def test_the_shipped_defaults_train_and_sample(tiny_flux, demo_dataset, tmp_path):
    """The schema's defaults (bf16 model and step, adamw8bit, quantize and checkpointing auto,
    sampling on, 512-1024 px buckets) with only the model, the dataset, the steps and the sample
    size changed."""
    config = defaults()
    config.update(model={"path": tiny_flux}, dataset={"folder": demo_dataset})
    config["train"] = {"steps": 3}
    config["sample"] = {"width": 64, "height": 64}
    config["save"] = {"output_dir": str(tmp_path / "output")}
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps(config))
    done = run_cli("train", str(path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "output" / "my_lora"
    assert (run / "my_lora.safetensors").is_file()
    assert sorted(int(name) for name in os.listdir(run / "samples")) == [0, 3]
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["model"]["dtype"], recorded["train"]["dtype"]) == ("bf16", "bf16")
    assert recorded["train"]["optimizer"] == "adamw8bit"


def test_a_node_failure_is_one_line_naming_the_node_and_what_to_change(
        demo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORALAB_MODELS", str(tmp_path))
    (tmp_path / "diffusers" / "no-model").mkdir(parents=True)  # a folder, but not a diffusers one
    base, = call("LoRALabLoadBaseModel", family="flux", path="no-model",
                 dtype="bf16", quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **widget_defaults("LoRALabConfigureLoRA"))
    with pytest.raises(NodeError) as error:
        call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config, name="x",
             resume=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("LoRA Lab TrainLoRA failed (ModelError): model.path")
    assert "no-model" in message and "model_index.json" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained trace

    # an unexpected failure says so, and where the traceback went
    class Broken:
        section = {"quantize": "none"}
        family = None

        def pipeline(self):
            raise KeyError("transformer")

        def release_after(self, prompt, node_id):
            pass

    with pytest.raises(NodeError, match=r"SampleGrid failed \(KeyError\).*traceback is in the ComfyUI log"):
        call("LoRALabSampleGrid", base_model=Broken(), prompts="a", strengths="0", seed=1,
             steps=2, guidance=4.0, width=64, height=64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA GPU nf4 trains")
def test_nf4_on_a_cpu_is_refused_before_loading_with_what_to_use(resolved):
    from loralab.core.trainer import PrecisionError, train

    with pytest.raises(PrecisionError, match='model.quantize = "nf4" trains only on a CUDA GPU.*"fp8"'):
        train(resolved(model={"family": "flux", "path": "/nowhere", "quantize": "nf4"}))  # refused before loading
