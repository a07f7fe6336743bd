"""The pack inside a real ComfyUI server: it loads, /object_info lists the nodes, and a training
workflow posted to /prompt trains, saves the LoRA where LoraLoader finds it and returns the grid.

Runs only with LORALAB_COMFYUI (a ComfyUI folder) and LORALAB_COMFYUI_PYTHON (its Python, with
the pack's requirements), else skips (fails with LORALAB_REQUIRE_COMFYUI=1, see comfyui_env.py).
Afterwards ComfyUI's log must hold no warning, error or traceback from the pack. The server runs
with --cpu on a free port with a temporary --base-directory, so the user's models, outputs and
custom nodes are left alone (comfyui_env.Server)."""
import json
import os
import re
import time
import urllib.parse

import pytest

import loralab
from loralab.nodes import NODE_CLASS_MAPPINGS

PACK = os.path.dirname(os.path.abspath(loralab.__file__))
WORKFLOWS = os.path.join(PACK, "workflows")
# `server`: conftest.py's, one real ComfyUI for the session (test_sd_workflows.py posts to it too)


def training_workflow(name):
    """The shipped quickstart, shorter, with the grid and the loss plot also saved by
    ComfyUI's SaveImage."""
    with open(os.path.join(WORKFLOWS, "quickstart.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    prompt["3"]["inputs"].update(steps=8, save_every=4, sample_every=4)
    prompt["4"]["inputs"]["name"] = name
    prompt["6"]["inputs"]["steps"] = 2
    prompt["20"] = {"class_type": "SaveImage", "inputs": {
        "images": ["6", 0], "filename_prefix": f"loralab/{name}_grid"}}
    prompt["21"] = {"class_type": "SaveImage", "inputs": {
        "images": ["4", 1], "filename_prefix": f"loralab/{name}_loss"}}
    return prompt


def test_the_pack_loads_and_object_info_lists_its_nodes_as_declared(server):
    imported = [line for line in server.log().splitlines() if "comfyui-loralab" in line]
    assert imported and not any("IMPORT FAILED" in line for line in imported), server.log()
    assert "Traceback" not in server.log()
    info = server.get_json("/object_info")
    for class_type, node_class in NODE_CLASS_MAPPINGS.items():
        listed = info[class_type]
        declared = node_class.INPUT_TYPES()
        for section in ("required", "optional"):
            assert list(listed["input"].get(section, {})) == list(declared.get(section, {})), (
                class_type, section)
        assert listed["output"] == list(node_class.RETURN_TYPES)
        assert listed["output_name"] == list(node_class.RETURN_NAMES)
        assert listed["output_node"] == bool(getattr(node_class, "OUTPUT_NODE", False))
        assert listed["category"] == "LoRA Lab"


@pytest.fixture(scope="module")
def quickstart(server):
    """The shipped quickstart posted to /prompt, once per server: its history entry."""
    started = time.monotonic()
    entry = server.run_prompt(training_workflow("server_check"))
    print(f"\ntraining workflow ran in {time.monotonic() - started:.1f} s; "
          f"outputs of nodes {sorted(entry.get('outputs', {}))}")
    return entry


def test_a_posted_training_workflow_trains_saves_into_loras_and_returns_the_grid(quickstart,
                                                                                   server):
    entry = quickstart
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-4000:]
    outputs = entry["outputs"]

    # SaveCheckpoint: into the first loras folder, and LoraLoader lists it
    lora_path, = outputs["5"]["text"]
    loras = server.base / "models" / "loras"
    assert lora_path == str(loras / "loralab" / "server_check_00001.safetensors")
    assert os.path.getsize(lora_path) > 0
    listed = server.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]
    assert "loralab/server_check_00001.safetensors" in listed["lora_name"][0]

    # SampleGrid shows its grid in ComfyUI (its "ui" images), and /view serves it
    grid, = outputs["6"]["images"]
    assert grid["type"] == "output" and grid["filename"].endswith(".png")
    png = server.get("/view?" + urllib.parse.urlencode(grid))
    assert png.startswith(b"\x89PNG")
    # ComfyUI's own SaveImage and PreviewImage took the grid and the loss plot
    for node_id in ("20", "21", "7"):
        image, = outputs[node_id]["images"]
        assert server.get("/view?" + urllib.parse.urlencode(image)).startswith(b"\x89PNG")
    summary, = outputs["8"]["text"]
    assert "finished: step 8 of 8" in summary
    run_folder = server.base / "output" / "server_check"
    assert sorted(os.listdir(run_folder / "samples")) == ["000000000", "000000004", "000000008"]


# -- train, then generate with ComfyUI's own sampler ------------------------------------------------

COMFY_SHAPED = dict(layers=1, single_layers=1, heads=2, head_dim=128, rope=(16, 56, 56),
                    text_dim=768, clip_dim=768, vae_channels=(16, 32, 32), latent_channels=16)


def write_comfyui_loadable_models(models, monkeypatch):
    """Random models that LoRA Lab trains on and ComfyUI's loaders take. ComfyUI detects a FLUX
    transformer only with head_dim 128 (rope axes 16, 56, 56) and 16 latent channels, and builds
    a 128-channel [1, 2, 4, 4] VAE; one CLIP-L file (CLIPLoader) gives 768-wide text and pooled
    vectors, so the transformer takes those."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from loralab.core.families.flux import tiny

    monkeypatch.setitem(tiny.PRESETS, "comfyui-shaped", COMFY_SHAPED)
    folder = tiny.build_tiny_flux(str(models / "diffusers" / "tiny-flux"), "comfyui-shaped")
    (models / "diffusion_models").mkdir()
    tiny.write_single_file(folder, str(models / "diffusion_models" / "tiny-flux.safetensors"))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        projection_dim=768)).state_dict()
    # ComfyUI's CLIP-L keys start with text_model. (transformers 5 leaves the prefix out)
    clip = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()}
    clip["text_projection.weight"] = torch.eye(768)
    (models / "text_encoders").mkdir()
    save_file({k: v.half().contiguous() for k, v in clip.items()},
              str(models / "text_encoders" / "tiny-clip-l.safetensors"))
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                        use_post_quant_conv=False)
    (models / "vae").mkdir()
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()},
              str(models / "vae" / "tiny-vae.safetensors"))


def train_then_generate_workflow(strengths):
    """TrainLoRA on the diffusers folder -> LoRALabApplyLoRA on the same transformer loaded by
    UNETLoader -> KSampler -> VAEDecode -> SaveImage, once per strength."""
    with open(os.path.join(WORKFLOWS, "quickstart.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    for unused in ("6", "7", "8"):
        del prompt[unused]
    prompt["1"]["inputs"].update(path="", comfyui_model="diffusers/tiny-flux")
    prompt["3"]["inputs"].update(steps=12, save_every=12, sample_every=0, lr=0.002)
    prompt["4"]["inputs"]["name"] = "generate_check"

    def node(node_id, class_type, **inputs):
        prompt[node_id] = {"class_type": class_type, "inputs": inputs}

    node("10", "UNETLoader", unet_name="tiny-flux.safetensors", weight_dtype="default")
    node("11", "CLIPLoader", clip_name="tiny-clip-l.safetensors", type="stable_diffusion",
         device="default")
    node("12", "VAELoader", vae_name="tiny-vae.safetensors")
    node("13", "CLIPTextEncode", text="a photo of sks", clip=["11", 0])
    node("14", "FluxGuidance", guidance=3.5, conditioning=["13", 0])
    node("15", "CLIPTextEncode", text="", clip=["11", 0])
    node("16", "EmptySD3LatentImage", width=64, height=64, batch_size=1)
    for index, strength in enumerate(strengths):
        apply, sample, decode, save = (f"{20 + 10 * index + offset}" for offset in range(4))
        node(apply, "LoRALabApplyLoRA", model=["10", 0], lora=["4", 0], strength=strength)
        node(sample, "KSampler", model=[apply, 0], positive=["14", 0], negative=["15", 0],
             latent_image=["16", 0], seed=42, steps=4, cfg=1.0, sampler_name="euler",
             scheduler="simple", denoise=1.0)
        node(decode, "VAEDecode", samples=[sample, 0], vae=["12", 0])
        node(save, "SaveImage", images=[decode, 0], filename_prefix=f"generated/strength_{strength:g}")
    return prompt


def test_a_graph_that_trains_then_generates_with_comfyuis_sampler(server, monkeypatch):
    import numpy as np
    from PIL import Image

    started = time.monotonic()
    write_comfyui_loadable_models(server.base / "models", monkeypatch)
    built = time.monotonic() - started
    entry = server.run_prompt(train_then_generate_workflow(strengths=(0, 10)))
    print(f"\nmodels built in {built:.1f} s; train-then-generate ran in "
          f"{time.monotonic() - started - built:.1f} s")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-4000:]
    images = []
    for save in ("23", "33"):
        image, = entry["outputs"][save]["images"]
        images.append(np.asarray(Image.open(server.base / "output" / image["subfolder"]
                                            / image["filename"])))
    assert images[0].shape == (64, 64, 3)
    assert not np.array_equal(images[0], images[1])  # the LoRA changed what was generated
    assert "lora key not loaded" not in server.log()  # ComfyUI took every key of the LoRA


# -- ComfyUI's log, once the pack was imported and ran ---------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TROUBLE = re.compile(r"\[(WARNING|ERROR|CRITICAL)\]|warn|error|exception|traceback|failed|fatal"
                     r"|cannot import", re.IGNORECASE)


def pack_trouble(log, pack=PACK):
    """What in ComfyUI's log ties a warning, an error or a traceback to the pack: a line that
    names the pack (loralab, LoRA Lab, its folder) and is a warning or an error, or a whole
    traceback any line of which names it. ComfyUI prints a logged record's level as [LEVEL]; a
    Python warning reads `file:line: SomeWarning: ...`."""
    def names_pack(line):
        lowered = line.lower()
        return "loralab" in lowered or "lora lab" in lowered or pack in line

    lines = ANSI.sub("", log).splitlines()
    found, index = [], 0
    while index < len(lines):
        if "Traceback (most recent call last)" not in lines[index]:
            if names_pack(lines[index]) and TROUBLE.search(lines[index]):
                found.append(lines[index])
            index += 1
            continue
        end = index + 1  # the frames are indented; the exception's own line closes the block
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
            end += 1
        block = lines[index:end + 1]
        if any(names_pack(line) for line in block):
            found.append("\n".join(block))
        index = end + 1
    return found


def test_pack_trouble_finds_warnings_errors_and_tracebacks_that_name_the_pack():
    log = "\n".join([
        "\x1b[32m[INFO]\x1b[0m    0.4 seconds: /base/custom_nodes/comfyui-loralab",
        "\x1b[33m[WARNING]\x1b[0m ****** User settings have been changed ******",
        "\x1b[31m[ERROR]\x1b[0m LoRA Lab TrainLoRA failed",
        "Traceback (most recent call last):",
        '  File "/elsewhere/execution.py", line 1, in run',
        f'  File "{PACK}/nodes/train.py", line 2, in train',
        "    raise ValueError('no')",
        "ValueError: no",
        "Traceback (most recent call last):",
        '  File "/elsewhere/nodes.py", line 3, in load',
        "ImportError: not ours",
        f"{PACK}/core/x.py:7: FutureWarning: old",
        "   0.1 seconds (IMPORT FAILED): /base/custom_nodes/comfyui-loralab",
        "[INFO] LoRALabTrainLoRA: step 8 of 8",
    ])
    found = pack_trouble(log)
    assert found == ["[ERROR] LoRA Lab TrainLoRA failed", "\n".join(log.splitlines()[3:8]),
                     f"{PACK}/core/x.py:7: FutureWarning: old",
                     "   0.1 seconds (IMPORT FAILED): /base/custom_nodes/comfyui-loralab"], found


def test_comfyuis_log_has_no_warning_error_or_traceback_from_the_pack(server, quickstart):
    """Last in this file, so the log holds the pack's import, its node registration and every
    run above (at least the quickstart)."""
    log = ANSI.sub("", server.log())
    imported = [line for line in log.splitlines() if "custom_nodes/comfyui-loralab" in line]
    assert any(re.search(r"\d seconds: ", line) for line in imported), log[-4000:]
    assert not any("IMPORT FAILED" in line for line in imported), log[-4000:]
    assert "got prompt" in log and "Prompt executed" in log, log[-4000:]
    trouble = pack_trouble(log)
    assert not trouble, "ComfyUI's log ties these to LoRA Lab:\n" + "\n".join(trouble)
