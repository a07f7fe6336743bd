"""Sharing memory with ComfyUI, on the CPU: a node reads from the graph ComfyUI hands it whether a
later node uses the base model, and frees the pipeline (RAM and accelerator) when none does.
The real-ComfyUI check of the process's peak RAM is in test_comfyui_ram.py."""
import json
import os
import weakref

import pytest

from loralab.nodes.graph_use import used_later

from test_nodes import FAST_SETTINGS, call, widget_defaults

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")

pytestmark = pytest.mark.usefixtures("one_thread")


def shipped(name):
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        return json.load(f)


def test_a_later_node_that_needs_the_training_or_has_not_run_keeps_the_model():
    quickstart = shipped("quickstart.json")  # LoadBaseModel 1 -> TrainLoRA 4 -> SampleGrid 6
    assert quickstart["6"]["inputs"]["base_model"] == ["1", 0]
    assert quickstart["6"]["inputs"]["lora"] == ["4", 0]
    assert used_later(quickstart, "4", "base_model")       # the grid after training uses it
    assert not used_later(quickstart, "6", "base_model")   # nothing after the grid does
    # the shipped SD1.5 graph generates with ComfyUI's own loader after training: freed
    assert not used_later(shipped("sd15-train-then-generate.json"), "4", "base_model")
    # a grid of the base model that does not wait for the training: kept until both ran
    quickstart["6"]["inputs"].pop("lora")
    assert used_later(quickstart, "4", "base_model")
    assert not used_later(quickstart, "4", "base_model", ran={"6"})
    assert used_later(quickstart, "6", "base_model")
    assert not used_later(quickstart, 6, "base_model", ran={4})
    # a grid two links further on (its LoRA through another node) waits for the training
    quickstart["6"]["inputs"]["lora"] = ["30", 0]
    quickstart["30"] = {"class_type": "AnotherPacksNode", "inputs": {"lora": ["4", 0]}}
    assert used_later(quickstart, 4, "base_model", ran={"6"})


@pytest.mark.parametrize("prompt, node_id", [(None, None), ({}, "4"), ({"4": {"inputs": {}}}, "4"),
                                             ("not a graph", "4")])
def test_a_graph_that_cannot_be_read_keeps_the_model(prompt, node_id):
    assert used_later(prompt, node_id, "base_model")


def training_graph(later_grid):
    """LoadBaseModel 1, LoadDataset 2, ConfigureLoRA 3, TrainLoRA 4 and, if asked, a SampleGrid 6
    of the LoRA: the prompt as ComfyUI hands it to the nodes."""
    prompt = {node_id: node for node_id, node in shipped("quickstart.json").items()
              if node_id in ("1", "2", "3", "4") + (("6",) if later_grid else ())}
    assert set(prompt["4"]["inputs"]) >= {"base_model", "dataset", "config"}
    return prompt


@pytest.mark.parametrize("later_grid", [False, True])
def test_training_frees_the_pipeline_unless_a_later_node_uses_it(later_grid, tiny_flux, demo_dataset,
                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"),
                                             **FAST_SETTINGS, "steps": 2})
    transformer = weakref.ref(base.pipeline().transformer)
    lora, _, _ = call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config,
                      name="shared", resume=True, prompt=training_graph(later_grid), unique_id="4")
    assert lora.status == "finished"
    if later_grid:  # kept for the grid, which then is the last to use it
        assert base.loaded is not None and transformer() is base.loaded.transformer
        call("LoRALabSampleGrid", base_model=base, prompts="a photo", strengths="0,1", lora=lora,
             seed=1, steps=1, guidance=1.0, width=64, height=64,
             prompt=training_graph(later_grid), unique_id="6")
    assert base.loaded is None and transformer() is None  # nothing holds it any more: memory freed
    assert lora.tensors()  # the LoRA needs no pipeline


def test_a_grid_of_the_base_model_keeps_it_for_the_training_that_has_not_run(
        tiny_flux, demo_dataset, tmp_path, monkeypatch):
    """Generate, then train, then ComfyUI generates: the grid keeps the model for TrainLoRA (one
    load, not two), and TrainLoRA frees it for ComfyUI's loader."""
    monkeypatch.chdir(tmp_path)
    graph = training_graph(later_grid=True)
    graph["6"]["inputs"].pop("lora")  # a grid of the base model: it does not wait for the training
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none")
    call("LoRALabSampleGrid", base_model=base, prompts="a photo", strengths="0", seed=1, steps=1,
         guidance=1.0, width=64, height=64, prompt=graph, unique_id="6")
    transformer = weakref.ref(base.loaded.transformer)  # kept: TrainLoRA has not used it yet
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"),
                                             **FAST_SETTINGS, "steps": 2})
    call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config, name="after_grid",
         resume=True, prompt=graph, unique_id="4")
    assert base.loaded is None and transformer() is None
