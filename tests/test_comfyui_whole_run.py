"""`loralab run --comfyui DIR`: a workflow that mixes LoRA Lab's nodes with ComfyUI's own runs
whole, headless, with ComfyUI's Python.

The runs need LORALAB_COMFYUI (a ComfyUI folder) and LORALAB_COMFYUI_PYTHON (its Python, with
the pack's requirements), else they skip (fail with LORALAB_REQUIRE_COMFYUI=1, see
comfyui_env.py); ComfyUI gets a temporary --base-directory, so the user's models and
outputs are left alone."""
import json
import os
import shutil
import subprocess

import pytest

import loralab

from comfyui_env import comfyui_or_skip
from conftest import run_cli

PACK = os.path.dirname(os.path.abspath(loralab.__file__))


def run_whole(workflow, tmp_path, *options):
    """`loralab run --comfyui` with ComfyUI's Python; this checkout is importable as `loralab`
    through a link, so nothing needs installing into ComfyUI's environment."""
    folder, python = comfyui_or_skip()
    packages = tmp_path / "packages"
    packages.mkdir()
    os.symlink(PACK, packages / "loralab")
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    base = tmp_path / "comfyui-base"
    command = [python, "-m", "loralab.cli", "run", str(path), "--comfyui", folder,
               "--comfyui-args", f"--base-directory {base}", *options]
    env = {**os.environ, "PYTHONPATH": str(packages)}
    env.pop("LORALAB_COMFYUI", None)  # the flag alone must be enough
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, base


def test_with_comfyui_the_input_dir_is_comfyuis_input_folder(tmp_path, demo_dataset):
    """`loralab run --comfyui --input-dir DIR`: ComfyUI's input folder is DIR, and LoadDataset's
    folder a name inside it, as in ComfyUI; /etc is refused there too."""
    shutil.copytree(demo_dataset, tmp_path / "data" / "mine")
    workflow = {"1": {"class_type": "LoRALabLoadDataset", "inputs": {
                    "folder": "mine", "caption_ext": "txt", "trigger_word": "sks", "repeats": 1,
                    "resolution": "64", "caption_dropout_rate": 0.0}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    done, _ = run_whole(workflow, tmp_path, "--input-dir", str(tmp_path / "data"))
    assert "images: 6 found" in done.stdout
    workflow["1"]["inputs"]["folder"] = "/etc"
    (tmp_path / "etc").mkdir()
    with pytest.raises(AssertionError, match="folder: '/etc' is an absolute path"):
        run_whole(workflow, tmp_path / "etc", "--input-dir", str(tmp_path / "data"))


def test_a_comfyui_folder_that_is_not_one_is_named(tmp_path):
    (tmp_path / "workflow.json").write_text("{}")
    done = run_cli("run", str(tmp_path / "workflow.json"), "--comfyui", str(tmp_path))
    assert done.returncode == 2
    assert f"{tmp_path} is not a ComfyUI folder" in done.stderr


def test_comfyuis_v1_and_v3_nodes_run_whole(tmp_path):
    workflow = {
        "1": {"class_type": "EmptyImage",  # V1 (nodes.py)
              "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "PrimitiveString", "inputs": {"value": "whole/red"}},  # V3
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    done, base = run_whole(workflow, tmp_path)
    saved = base / "output" / "whole" / "red_00001_.png"
    assert saved.is_file()
    assert f"node 3 'SaveImage': Tensor [1, 16, 32, 3], {saved}" in done.stdout
    assert "node 4 'PreviewAny': whole/red" in done.stdout
    assert "skipped" not in done.stdout + done.stderr


def test_a_workflow_mixing_lora_lab_and_comfyui_nodes_runs_whole(tmp_path):
    with open(os.path.join(PACK, "workflows", "quickstart.json"), encoding="utf-8") as f:
        workflow = json.load(f)  # its PreviewImage and PreviewAny are ComfyUI's nodes
    workflow["3"]["inputs"].update(steps=6, save_every=6, sample_every=0)
    workflow["6"]["inputs"]["steps"] = 2
    workflow["20"] = {"class_type": "PrimitiveString", "inputs": {"value": "loralab/grid"}}
    workflow["21"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0],
                                                            "filename_prefix": ["20", 0]}}
    done, base = run_whole(workflow, tmp_path)
    output = done.stdout + done.stderr
    assert "skipped" not in output
    for node in ("(PreviewImage)", "(PreviewAny)", "(SaveImage)", "(LoRALabTrainLoRA)"):
        assert node in output
    # LoRA Lab's nodes write where ComfyUI's folders say, as inside ComfyUI
    assert (base / "models" / "loras" / "loralab" / "quickstart_00001.safetensors").is_file()
    assert (base / "output" / "quickstart" / "quickstart.safetensors").is_file()
    assert (base / "output" / "loralab" / "grid_00001_.png").is_file()
    previews = os.listdir(base / "temp")
    assert len(previews) == 1 and previews[0].endswith(".png")  # PreviewImage: the loss plot
    assert "node 8 'Training summary': finished: step 6 of 6" in done.stdout


def test_with_only_the_environment_naming_comfyui_an_unimportable_one_is_skipped(tmp_path):
    """LORALAB_COMFYUI set for a Python that cannot import ComfyUI (here: a folder that is not
    one): the run goes on without ComfyUI's nodes, and says so."""
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    done = run_cli("run", str(tmp_path / "workflow.json"),
                   env={**os.environ, "LORALAB_COMFYUI": str(tmp_path)})
    assert f"note: LORALAB_COMFYUI is set, but {tmp_path} is not a ComfyUI folder" in done.stderr
    assert "no output node remains once these are skipped: 1 'EmptyImage'" in done.stderr
    assert done.returncode == 2
