"""Every shipped workflow replayed headless (`loralab run` as a real subprocess), API and UI format
alike, and the error each kind of bad workflow gives."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import loralab
from loralab.workflow_runner import WorkflowError, WorkflowInterrupted, interrupt, run_workflow, to_api, validate
from loralab.nodes.events import listening

from conftest import run_cli

NODES = loralab.NODE_CLASS_MAPPINGS
WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = ["quickstart", "flux-dev-train", "train-then-generate"]  # the FLUX graphs replayed here
ONLY_COMFYUI = "only ComfyUI can run it (no such node here); no output here needs it"
# The FLUX.1-dev graphs with the user's model swapped for the tiny one, and only the steps and
# the sizes made small: their precision, optimizer, checkpointing and sampling stay as shipped.
TINY = {
    "LoRALabLoadBaseModel": {"path": "builtin:random-flux", "diffusion_model": "none", "clip_l": "none",
                             "t5": "none", "vae": "none"},
    "LoRALabLoadDataset": {"folder": "builtin:demo", "resolution": "64"},
    "LoRALabConfigureLoRA": {"steps": 6, "sample_width": 64, "sample_height": 64, "sample_steps": 2},
    "LoRALabSampleGrid": {"width": 64, "height": 64, "steps": 2},
}


def workflow(name):
    return os.path.join(WORKFLOWS, name)


def read(name):
    with open(workflow(name), encoding="utf-8") as f:
        return json.load(f)


def with_tiny_model(api):
    """The API workflow with TINY's values put into its LoRA Lab nodes."""
    for node in api.values():
        node["inputs"].update(TINY.get(node["class_type"], {}))
    return api


def test_every_workflow_ships_in_both_formats():
    shipped = set(os.listdir(WORKFLOWS))
    api = {name[:-len(".json")] for name in shipped if not name.endswith(".ui.json")}
    assert shipped == {f"{n}.json" for n in api} | {f"{n}.ui.json" for n in api}
    assert set(NAMES) <= api


SHIPPED = sorted(name[:-len(".json")] for name in os.listdir(WORKFLOWS) if not name.endswith(".ui.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_ui_and_api_format_are_the_same_graph(name):
    api = to_api(workflow(f"{name}.json"), NODES)
    ui = to_api(workflow(f"{name}.ui.json"), NODES)
    assert api.nodes.keys() == ui.nodes.keys()
    for node_id, node in api.nodes.items():
        converted = ui.nodes[node_id]
        assert (converted["class_type"], converted["_meta"]) == (node["class_type"], node["_meta"])
        if node["class_type"] in NODES:
            assert converted["inputs"] == node["inputs"], node_id
        else:  # without the class, the UI format's widget values cannot be named; links can
            assert converted["inputs"] == {k: v for k, v in node["inputs"].items() if isinstance(v, list)}
    assert api.skipped == ui.skipped


def test_the_ui_quickstart_runs_headless(tmp_path):
    """The UI file, shortened at its widgets' places (the API file runs at its shipped sizes in
    test_demo_concept.py, by name; both convert to one graph: test_ui_and_api_format_are_the_same_graph)."""
    shipped = read("quickstart.ui.json")
    configure = next(n for n in shipped["nodes"] if n["id"] == 3)["widgets_values"]  # INPUT_TYPES order
    configure[2], configure[7], configure[10], configure[14] = 6, 6, 3, 2  # steps, save_every, sample_every, sample_steps
    next(n for n in shipped["nodes"] if n["id"] == 6)["widgets_values"][4] = 2
    (tmp_path / "quickstart.ui.json").write_text(json.dumps(shipped))
    done = run_cli("run", str(tmp_path / "quickstart.ui.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped node 7 'Loss plot' (PreviewImage): {ONLY_COMFYUI}" in done.stderr
    assert "skipped node 8 'Training summary' (PreviewAny)" in done.stderr
    assert "[4/6] node 4 'Train LoRA' (LoRALabTrainLoRA)" in done.stderr
    lora = tmp_path / "output" / "loras" / "loralab" / "quickstart_00001.safetensors"
    grid = tmp_path / "output" / "quickstart" / "grid_00001.png"
    assert f"node 5 'Save LoRA to loras': {lora}" in done.stdout
    assert str(grid) in done.stdout and grid.is_file()
    assert "finished: step 6 of 6" in done.stdout
    assert load_file(lora)  # a LoRA with tensors
    config = json.loads((tmp_path / "output" / "quickstart" / "config.json").read_text())
    assert (config["train"]["steps"], config["save"]["save_every"], config["sample"]["sample_every"],
            config["sample"]["sample_steps"]) == (6, 6, 3, 2)  # each widget edit landed where it means


def test_train_then_generate_runs_its_lora_lab_part_and_names_what_it_skipped(tmp_path):
    path = tmp_path / "train-then-generate.json"
    path.write_text(json.dumps(with_tiny_model(read("train-then-generate.json"))))
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for skipped in (f"node 10 'FLUX.1-dev transformer' (UNETLoader): {ONLY_COMFYUI}",
                    "node 11 'Text encoders' (DualCLIPLoader)", "node 18 'KSampler' (KSampler)",
                    "node 13 'Apply the new LoRA' (LoRALabApplyLoRA): no output node needs it",
                    "node 20 'Save image' (SaveImage)"):
        assert f"skipped {skipped}" in done.stderr
    assert (tmp_path / "output" / "loras" / "loralab" / "my_flux_lora_00001.safetensors").is_file()


# The FLUX.1-dev graphs as shipped (four ComfyUI files, quantize and checkpointing auto, bf16,
# adamw8bit, samples at step 0 and the end) with the tiny model's files in their dropdowns.
TINY_FILES = {"diffusion_model": "tiny-flux.safetensors", "clip_l": "clip_l.safetensors",
              "t5": "t5xxl.safetensors", "vae": "ae.safetensors"}


# the API files: each .ui.json converts to the same graph (test_ui_and_api_format_are_the_same_graph)
@pytest.mark.parametrize("file_name", [f"{n}.json" for n in NAMES if n != "quickstart"])
def test_every_workflow_trains_and_samples_as_shipped_from_comfyui_files(file_name, comfyui_folder, tmp_path):
    api = {node_id: dict(node) for node_id, node in to_api(workflow(file_name), NODES).nodes.items()}
    shipped = {n["class_type"]: n["inputs"] for n in api.values()}
    for node in api.values():
        node["inputs"].update({key: value for key, value in TINY.get(node["class_type"], {}).items()
                               if node["class_type"] != "LoRALabLoadBaseModel"})
        if node["class_type"] == "LoRALabLoadBaseModel":
            node["inputs"].update(TINY_FILES)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(api))
    env = {k: v for k, v in os.environ.items() if k != "LORALAB_COMFYUI"}
    done = run_cli("run", str(path), cwd=tmp_path, env={**env, "LORALAB_MODELS": str(comfyui_folder / "models")})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "output" / "my_flux_lora"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["path"] is None and config["model"]["t5_path"].endswith("t5xxl.safetensors")
    assert config["model"]["quantize"] == "none"  # auto on a CPU
    assert config["train"]["dtype"] == shipped["LoRALabConfigureLoRA"]["train_dtype"] == "bf16"
    assert config["train"]["optimizer"] == shipped["LoRALabConfigureLoRA"]["optimizer"]
    assert sorted(int(step) for step in os.listdir(run / "samples")) == [0, 6]


@pytest.mark.parametrize("file_name", ["flux-dev-train.json", "flux-dev-train.ui.json"])
def test_flux_dev_workflow_without_the_model_fails_before_running_naming_the_paths(file_name, tmp_path):
    done = run_cli("run", workflow(file_name), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    assert ("node 1 'FLUX.1-dev (ComfyUI's model files)' (LoRALabLoadBaseModel), input 'checkpoint, "
            "clip_l, diffusion_model, path, t5, text_encoder, vae': diffusion_model: 'flux1-dev.safetensors' is not in "
            "ComfyUI's diffusion_models folders") in done.stderr
    assert ("node 2 'My dataset (edit folder)' (LoRALabLoadDataset), input 'folder, "
            "regularization_folder': folder: dataset folder 'my_dataset' not found in the input "
            f"folder {tmp_path / 'input'}") in done.stderr
    assert not (tmp_path / "output").exists()


# -- bad workflows ---------------------------------------------------------------------------------

def broken(change):
    api = read("quickstart.json")
    change(api)
    return api


BAD = {
    "unknown node": (
        lambda api: api["4"].update(class_type="LoRALabTrainLoRAX"),
        "node 4 'Train LoRA' (LoRALabTrainLoRAX): node 5 'Save LoRA to loras' "
        "(LoRALabSaveCheckpoint) needs it, but no 'LoRALabTrainLoRAX' node runs here"),
    "missing input": (
        lambda api: api["4"]["inputs"].pop("config"),
        "node 4 'Train LoRA' (LoRALabTrainLoRA), input 'config': missing required input"),
    "wrong link type": (
        lambda api: api["6"]["inputs"].update(lora=["2", 0]),
        "node 6 'Base vs LoRA' (LoRALabSampleGrid), input 'lora': expects LORALAB_LORA but "
        "output 0 of node 2 'Demo dataset (drawn locally)' gives LORALAB_DATASET"),
    "value out of range": (
        lambda api: api["3"]["inputs"].update(lr=5.0),
        "node 3 'LoRA settings' (LoRALabConfigureLoRA), input 'lr': 5.0 is above the maximum 1.0"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_workflow_is_refused_naming_node_title_and_input(kind):
    change, message = BAD[kind]
    with pytest.raises(WorkflowError) as error:
        validate(broken(change), NODES)
    assert message in str(error.value)


def test_a_bad_ui_workflow_names_the_same(tmp_path):
    ui = read("quickstart.ui.json")
    settings = next(n for n in ui["nodes"] if n["id"] == 3)
    settings["widgets_values"][4] = 5.0  # lr, after linear, linear_alpha, steps, batch_size
    path = tmp_path / "bad.ui.json"
    path.write_text(json.dumps(ui))
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert BAD["value out of range"][1] in done.stderr


def test_a_refused_workflow_is_answered_before_torch_loads(tmp_path):
    """`loralab run` validates before anything imports torch (seconds of a user's wait, and of
    every refusal test here): the same refusal as above, and torch never imported."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken(BAD["value out of range"][0])))
    check = ("import sys; from loralab.cli import main; code = main(['run', sys.argv[1]]); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "LORALAB_COMFYUI"})
    assert BAD["value out of range"][1] in done.stderr
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr


# -- a node of another pack ------------------------------------------------------------------------

FANCY = "SomePack.FancyUpscale"  # a custom pack LoRA Lab knows nothing of


def fancy_node(inputs, links):
    return {"id": 9, "type": FANCY, "mode": 0, "title": "Fancy upscale", "inputs": inputs,
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": links}],
            "widgets_values": [2.0, "lanczos"]}


def grid_then_fancy(ui_format):
    """quickstart's grid of the base model alone (no training, so it is quick), then the other
    pack's upscaler on the grid, then ComfyUI's preview: no LoRA Lab output needs the two."""
    if not ui_format:
        api = read("quickstart.json")
        api["6"]["inputs"].pop("lora")
        api["6"]["inputs"].update(prompts="a photo", strengths="0", steps=1)
        api["7"]["inputs"]["images"] = ["9", 0]
        fancy = {"class_type": FANCY, "inputs": {"image": ["6", 0], "scale": 2.0, "method": "lanczos"},
                 "_meta": {"title": "Fancy upscale"}}
        return {"1": api["1"], "6": api["6"], "9": fancy, "7": api["7"]}
    ui = read("quickstart.ui.json")
    nodes = {node["id"]: node for node in ui["nodes"]}
    nodes[6]["inputs"][-1]["link"] = None  # no lora
    nodes[6]["widgets_values"][:5] = ["a photo", "0", 42, "fixed", 1]
    nodes[7]["inputs"][0]["link"] = 10
    ui["nodes"] = [nodes[1], nodes[6], fancy_node([{"name": "image", "type": "IMAGE", "link": 9}], [10]),
                   nodes[7]]
    ui["links"] = [link for link in ui["links"] if link[0] == 5] + [
        [9, 6, 0, 9, 0, "IMAGE"], [10, 9, 0, 7, 0, "IMAGE"]]
    return ui


def fancy_before_save(ui_format):
    """The full quickstart with the other pack's node between Train LoRA and Save LoRA."""
    if not ui_format:
        api = read("quickstart.json")
        api["9"] = {"class_type": FANCY, "inputs": {"lora": ["4", 0], "scale": 2.0},
                    "_meta": {"title": "Fancy upscale"}}
        api["5"]["inputs"]["lora"] = ["9", 0]
        return api
    ui = read("quickstart.ui.json")
    ui["nodes"].append(fancy_node([{"name": "lora", "type": "LORALAB_LORA", "link": 9}], [4]))
    ui["links"] = [link for link in ui["links"] if link[0] != 4] + [
        [9, 4, 0, 9, 0, "LORALAB_LORA"], [4, 9, 0, 5, 0, "LORALAB_LORA"]]
    return ui


@pytest.mark.parametrize("ui_format", [False, True], ids=["api", "ui"])
def test_a_node_of_another_pack_that_no_output_needs_is_skipped_and_named(ui_format, tmp_path):
    path = tmp_path / "fancy.json"
    path.write_text(json.dumps(grid_then_fancy(ui_format)))
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped node 9 'Fancy upscale' ({FANCY}): {ONLY_COMFYUI}" in done.stderr.splitlines()
    assert f"skipped node 7 'Loss plot' (PreviewImage): {ONLY_COMFYUI}" in done.stderr.splitlines()
    grid = next(line for line in done.stdout.splitlines() if line.startswith("node 6 'Base vs LoRA': "))
    assert os.path.isfile(grid.split(", ")[-1]), grid


@pytest.mark.parametrize("ui_format", [False, True], ids=["api", "ui"])
def test_a_node_of_another_pack_that_an_output_needs_is_refused_in_one_line(ui_format, tmp_path):
    path = tmp_path / "fancy.json"
    path.write_text(json.dumps(fancy_before_save(ui_format)))
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: node 9 'Fancy upscale' ({FANCY}): node 5 'Save LoRA to loras' (LoRALabSaveCheckpoint) "
        f"needs it, but no '{FANCY}' node runs here: run this workflow in ComfyUI (with the pack that "
        "provides it), or, for one of ComfyUI's own nodes, with loralab run --comfyui DIR"]
    assert not (tmp_path / "output").exists()


# -- stopping headless -----------------------------------------------------------------------------

def test_a_stop_request_saves_a_checkpoint_ends_the_run_and_a_rerun_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    api = broken(lambda api: api["3"]["inputs"].update(steps=4, sample_every=0))
    del api["6"]  # the grid is not what this is about

    def stop_at_step_2(event):  # what the first Ctrl+C does
        if event.get("type") == "step" and event["step"] == 2:
            interrupt.request_stop()

    with listening(stop_at_step_2), pytest.raises(WorkflowInterrupted, match="node 5"):
        run_workflow(api, NODES)
    run = tmp_path / "output" / "quickstart"
    assert (run / "quickstart_000000002.safetensors").is_file()
    assert not (tmp_path / "output" / "loras").exists()  # SaveCheckpoint did not run

    resumed = []
    with listening(lambda event: event.get("type") == "resume" and resumed.append(event["step"])):
        result = run_workflow(api, NODES)
    assert resumed == [2] and (run / "quickstart.safetensors").is_file()
    assert os.path.isfile(result.outputs["5"][0])
