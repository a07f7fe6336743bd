"""The shipped Z-Image, Qwen-Image and FLUX.2 klein train-then-generate workflows, checked end to end
as far as this machine allows, with only the models, the dataset, the steps, the learning rate and
the sizes swapped for tiny ones (precision, optimizer, timesteps, sampler, scheduler, shift, guidance
and the strengths 0 and 1 stay as shipped):

- headless: each UI-format file (which converts to the API file's graph: test_workflows.py),
  replayed by `loralab run`, trains from the model files picked in LoadBaseModel's dropdowns (the
  shipped file names, linked to tiny files of ComfyUI's layout) and saves a LoRA; the generation
  half, ComfyUI's own nodes, is named as skipped.
- a real ComfyUI: the shipped graph's node types, link types and choices (CLIPLoader's type, the
  sampler, the scheduler, the file names in the dropdowns) are ComfyUI's (its /object_info);
  its training half, posted to /prompt, trains from the same files and saves into loras. One
  name differs there: Z-Image and FLUX.2 klein both ship qwen_3_4b.safetensors, and one ComfyUI
  holds one file of that name, Z-Image's tiny Qwen3, so klein's tiny Qwen3 (of other widths)
  stands beside it as KLEIN_TEXT_ENCODER, which klein's LoadBaseModel and CLIPLoader pick there.
- ComfyUI's own generation code, in ComfyUI's Python, on that saved LoRA: each workflow's
  generation nodes run as ComfyUI's node classes, in the graph's order with the graph's values
  (CLIPLoader with the graph's type, CLIPTextEncode, ModelSamplingAuraFlow, EmptySD3LatentImage,
  KSampler; FLUX.2: EmptyFlux2LatentImage, Flux2Scheduler, CFGGuider, KSamplerSelect,
  RandomNoise, SamplerCustomAdvanced), the LoRA patched at the graph's strengths 0 and 1 by
  ComfyUI's LoRA loading (load_lora_for_models, which ApplyLoRA calls), and the two results
  differ. Where ComfyUI's loaders assume a real-size model, only what they assume is supplied:
  CLIPLoader (Z-Image, FLUX.2) gets the tiny Qwen3's widths for the ones it fixes, and its
  detection's answer (it names Qwen3-4B by its hidden width 2560); UNETLoader (Qwen-Image,
  FLUX.2) gets the widths its detection fixes (heads of 128; for FLUX.2 the config is given whole,
  as model_detection gives klein's) and reads the very file the graph trained from.

What is not checked here, because ComfyUI builds these parts only at their real sizes (too big for
a test on a CPU): Qwen-Image's CLIPLoader (Qwen2.5-VL's vision tower is built at its real size
whatever the file holds), so its prompts are fixed random tensors of the tiny text width; Z-Image's
UNETLoader (ComfyUI's Z-Image sizes its timestep layer differently from diffusers below dim 1024),
so ComfyUI's Z-Image is built at the tiny widths from its own classes with random weights; Z-Image's
and FLUX.2's VAELoader (FLUX.1's ae and FLUX.2's VAE at their real channels), so their latents are
compared, not decoded images. Qwen-Image's VAELoader decodes, so its two images are compared."""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open

import loralab
from loralab.workflow_runner import to_api

from comfyui_env import comfyui_python_or_skip, comfyui_source
from conftest import COMFYUI_SOURCE, run_cli
from test_comfyui_server import WORKFLOWS, pack_trouble
from test_sd_workflows import needed_by, with_tiny_widgets, without_comfyui

pytestmark = pytest.mark.usefixtures("one_thread")

NODES = loralab.NODE_CLASS_MAPPINGS
FAMILIES = ("zimage", "qwen_image", "flux2")
FILE_WIDGETS = {"diffusion_model": ("diffusion_models", "transformer"),
                "text_encoder": ("text_encoders", "text_encoder"), "vae": ("vae", "vae")}
ONLY_COMFYUI = "only ComfyUI can run it (no such node here); no output here needs it"
SIZE = 64
# the shipped graphs' values that are swapped: the drawn dataset, two steps (at a learning rate that
# moves a LoRA in two steps: at the shipped 1e-4 strength 1 changes a latent by 1e-5), small sizes
TINY = {
    "LoRALabLoadDataset": {"folder": "builtin:demo", "resolution": str(SIZE)},
    "LoRALabConfigureLoRA": {"steps": 2, "lr": 0.01, "sample_every": 0, "sample_width": SIZE, "sample_height": SIZE,
                             "sample_steps": 2},
    "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
    "EmptyFlux2LatentImage": {"width": SIZE, "height": SIZE},
    "Flux2Scheduler": {"steps": 3, "width": SIZE, "height": SIZE},
    "KSampler": {"steps": 3},
}
# Z-Image and FLUX.2 klein both ship qwen_3_4b.safetensors, and their tiny Qwen3s differ (widths,
# depth): the real ComfyUI's one text_encoders folder holds Z-Image's under that name and klein's
# under this one, which its graph's LoadBaseModel and CLIPLoader pick there
KLEIN_TEXT_ENCODER = "tiny-klein-qwen_3_4b.safetensors"


def shipped(family, ext=".json"):
    with open(os.path.join(WORKFLOWS, f"{family}-train-then-generate{ext}"), encoding="utf-8") as f:
        return json.load(f)


def tiny_values(class_type, family):
    return dict(TINY.get(class_type, {}))


def with_tiny_values(api, family):
    for node in api.values():
        node["inputs"].update(tiny_values(node["class_type"], family))
    return api


def on_server(api, family):
    """The graph as the real ComfyUI runs it: klein's text encoder by its name there."""
    if family == "flux2":
        for node in api.values():
            if node["class_type"] in ("LoRALabLoadBaseModel", "CLIPLoader"):
                node["inputs"]["text_encoder" if "text_encoder" in node["inputs"] else "clip_name"] = KLEIN_TEXT_ENCODER
    return api


def base_model_inputs(family):
    return next(n["inputs"] for n in shipped(family).values() if n["class_type"] == "LoRALabLoadBaseModel")


def assert_diffusers_lora(path):
    """peft's names under transformer., the scale baked in (no alpha)."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys), keys[:5]


# -- tiny models, under the shipped file names -------------------------------------------------------

# Tiny models whose LoRA layers have the shapes of ComfyUI's own model at the same widths, which
# also runs: Z-Image's feed-forward width is int(8/3 dim) in diffusers and 8/3 dim rounded up to a
# multiple of 256 in ComfyUI (equal at dim 288), and ComfyUI's Z-Image runs only from dim 256 (its
# timestep layer gives 256 values, its modulation takes min(dim, 256)); FLUX.2 with 32 latent
# channels, the 128 packed channels of ComfyUI's FLUX.2 latents; Z-Image's text encoder with 3
# layers (ComfyUI reads its second-to-last hidden state only from a deeper model than 2)
ZIMAGE_COMFY_SHAPED = dict(dim=288, heads=3, axes_dims=(32, 32, 32), layers=2, refiner_layers=2, text_dim=32,
                           text_layers=3, vae_channels=(16, 32), latent_channels=16)
FLUX2_COMFY_SHAPED = dict(heads=2, head_dim=16, axes_dims=(4, 4, 4, 4), layers=1, single_layers=1, text_dim=16,
                          text_layers=27, vae_channels=(16, 32), latent_channels=32)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{family: (diffusers folder, {part: ComfyUI-layout file})}: the families' tiny models, Z-Image's
    and FLUX.2's of the shapes above."""
    from loralab.core.families.flux2 import tiny as flux2_tiny
    from loralab.core.families.qwen_image import tiny as qwen_tiny
    from loralab.core.families.zimage import tiny as zimage_tiny

    if not os.path.isdir(os.path.join(COMFYUI_SOURCE, "comfy", "text_encoders", "qwen25_tokenizer")):
        pytest.skip(f"no ComfyUI source at {COMFYUI_SOURCE}: its Qwen tokenizer loads the text encoders")
    root = tmp_path_factory.mktemp("family-models")
    qwen = qwen_tiny.build_tiny_qwen_image(str(root / "qwen_image"), COMFYUI_SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(zimage_tiny.PRESETS, "comfy-shaped", ZIMAGE_COMFY_SHAPED)
        zimage = zimage_tiny.build_tiny(str(root / "zimage"), "comfy-shaped")
        patch.setitem(flux2_tiny.PRESETS, "comfy-shaped", FLUX2_COMFY_SHAPED)
        flux2 = flux2_tiny.build_tiny(str(root / "flux2"), "comfy-shaped")
    return {"zimage": (zimage, zimage_tiny.write_comfyui_files(zimage)),
            "qwen_image": (qwen, qwen_tiny.write_comfyui_files(qwen)),
            "flux2": (flux2, flux2_tiny.write_comfyui_files(flux2))}


def link_models(models, family, tiny_models, names=None):
    """The family's tiny ComfyUI-layout files in `models` under the names the shipped graph picks
    (or `names`' {widget: name})."""
    _, files = tiny_models[family]
    names = {**base_model_inputs(family), **(names or {})}
    for widget, (kind, part) in FILE_WIDGETS.items():
        (models / kind).mkdir(parents=True, exist_ok=True)
        os.symlink(files[part], models / kind / names[widget])


@pytest.fixture(scope="module")
def server_models(server, tiny_models):
    """The server's models folder: every family's tiny files under the shipped names, but klein's
    text encoder (KLEIN_TEXT_ENCODER)."""
    models = server.base / "models"
    for family in FAMILIES:
        link_models(models, family, tiny_models, {"text_encoder": KLEIN_TEXT_ENCODER} if family == "flux2" else None)
    return models


@pytest.fixture(scope="module")
def comfyui_like(tiny_models, tmp_path_factory):
    """{family: a ComfyUI-like folder}: models/ with that family's tiny files under the shipped
    names (Z-Image and FLUX.2 both name qwen_3_4b.safetensors), comfy/ ComfyUI's source (the
    tokenizers)."""
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"{family}-comfyui") / "ComfyUI"
        link_models(folder / "models", family, tiny_models)
        os.symlink(os.path.join(COMFYUI_SOURCE, "comfy"), folder / "comfy")
        folders[family] = folder
    return folders


# -- headless: `loralab run` -----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_the_shipped_workflow_trains_from_comfyuis_files_headless(family, comfyui_like, tmp_path):
    """The UI format, as the editor saves it (tests/test_workflows.py checks that it converts to
    the API format's graph with the same values; the API format is posted to ComfyUI below)."""
    tiny = with_tiny_widgets(shipped(family, ".ui.json"), family, tiny_values)
    path = tmp_path / f"{family}.ui.json"
    path.write_text(json.dumps(tiny))
    models = comfyui_like[family] / "models"
    done = run_cli("run", str(path), cwd=tmp_path, env=without_comfyui(LORALAB_MODELS=str(models)))
    assert done.returncode == 0, done.stderr[-3000:]

    assert "finished: step 2 of 2" in done.stdout
    lora = tmp_path / "output" / "loras" / "loralab" / f"my_{family}_lora_00001.safetensors"
    assert f"node 5 'Save LoRA (diffusers keys: ComfyUI, diffusers)': {lora}" in done.stdout
    assert_diffusers_lora(lora)
    config = json.loads((tmp_path / "output" / f"my_{family}_lora" / "config.json").read_text())
    assert config["model"]["family"] == family
    shipped_model = base_model_inputs(family)
    for widget, (kind, _) in FILE_WIDGETS.items():  # the files picked in the dropdowns, by the shipped names
        key = {"diffusion_model": "transformer_path", "text_encoder": "text_encoder_path", "vae": "vae_path"}[widget]
        assert config["model"][key] == str(models / kind / shipped_model[widget])
    settings = next(n["inputs"] for n in shipped(family).values() if n["class_type"] == "LoRALabConfigureLoRA")
    assert (config["train"]["dtype"], config["train"]["optimizer"], config["train"]["timestep_type"]) == (
        settings["train_dtype"], settings["optimizer"], settings["timestep_type"])

    # the generation half is ComfyUI's: each of its nodes is named as skipped
    graph = to_api(str(path), NODES)
    comfyui_nodes = [i for i, n in graph.nodes.items() if n["class_type"] not in NODES]
    assert {"10", "11", "12", "14", "15", "16", "24", "34"} <= set(comfyui_nodes)
    for node_id in comfyui_nodes:
        assert (f"skipped node {node_id} '{graph.title(node_id)}' ({graph.nodes[node_id]['class_type']}): "
                f"{ONLY_COMFYUI}") in done.stderr.splitlines()
    for node_id in ("20", "30"):
        assert f"skipped node {node_id} '{graph.title(node_id)}' (LoRALabApplyLoRA): no output node needs it" in done.stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ui_files_links_agree_with_its_nodes_as_the_editor_reads_them(family):
    """Each link [id, source, slot, target, slot, type] is listed on its source's output and set on
    its target's input, of that type; every linked input has its link; the counters are the
    highest ids (the editor numbers new nodes and links from them)."""
    ui = shipped(family, ".ui.json")
    nodes = {node["id"]: node for node in ui["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in ui["links"]:
        output, target_input = nodes[source]["outputs"][source_slot], nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and target_input["link"] == link_id, link_id
        assert output["type"] == target_input["type"] == kind, link_id
    linked = {(link[3], link[4]) for link in ui["links"]}
    assert linked == {(node["id"], slot) for node in ui["nodes"]
                      for slot, entry in enumerate(node["inputs"]) if entry.get("link") is not None}
    assert (ui["last_node_id"], ui["last_link_id"]) == (max(nodes), max(link[0] for link in ui["links"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_files_the_shipped_workflow_stops_before_running_naming_them(family, tmp_path):
    done = run_cli("run", f"{family}-train-then-generate", cwd=tmp_path)  # a shipped workflow, by name
    assert done.returncode == 2 and "Traceback" not in done.stderr
    title = next(n["_meta"]["title"] for n in shipped(family).values() if n["class_type"] == "LoRALabLoadBaseModel")
    assert (f"error: node 1 '{title}' (LoRALabLoadBaseModel), input 'checkpoint, clip_l, diffusion_model, path, t5, "
            f"text_encoder, vae': diffusion_model: '{base_model_inputs(family)['diffusion_model']}' is not in "
            "ComfyUI's diffusion_models folders") in done.stderr
    assert "dataset folder 'my_dataset' not found in the input folder" in done.stderr
    assert not (tmp_path / "output").exists()


# -- a real ComfyUI: the graph as ComfyUI declares its nodes, and the training half via /prompt ------

@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_declares_every_node_link_and_choice_of_the_shipped_graph(family, server, server_models):
    info = server.get_json("/object_info")
    api = shipped(family)
    for node_id, node in api.items():
        declared = info[node["class_type"]]["input"]
        inputs = {**declared.get("required", {}), **declared.get("optional", {})}
        assert set(declared.get("required", {})) <= set(node["inputs"]), (node_id, node["class_type"])
        for name, value in node["inputs"].items():
            kind = inputs[name][0]
            if isinstance(value, list):  # a link: the source's output type is the input's type
                assert info[api[value[0]]["class_type"]]["output"][value[1]] == kind, (node_id, name)
            elif isinstance(kind, list) or kind == "COMBO":  # a choice: among ComfyUI's options
                options = kind if isinstance(kind, list) else inputs[name][1]["options"]
                assert value in options, (node_id, name, value)
    # the UI format: ComfyUI's nodes' widgets_values in the order the editor reads them
    for node in shipped(family, ".ui.json")["nodes"]:
        if node["type"] not in NODES:
            assert comfyui_widgets(info[node["type"]], node["widgets_values"]) == {
                k: v for k, v in api[str(node["id"])]["inputs"].items() if not isinstance(v, list)}, node["id"]


def comfyui_widgets(info, values):
    """{widget: value} of a ComfyUI node's widgets_values, by its /object_info: its widget inputs in
    input_order, each seed-like one followed by its "control after generate" value."""
    named, values = {}, list(values)
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            kind, options = (info["input"][section][name] + [{}])[:2]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                named[name] = values.pop(0)
                if options.get("control_after_generate"):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
    assert not values, values
    return named


@pytest.fixture(scope="module")
def trained_in_comfyui(server, server_models):
    """{family: (history entry, the saved LoRA's path)}: each shipped graph's training half (what
    SaveCheckpoint needs) posted to /prompt, the files picked by their shipped names (klein's text
    encoder by KLEIN_TEXT_ENCODER)."""
    trained = {}
    for family in FAMILIES:
        api = needed_by(on_server(with_tiny_values(shipped(family), family), family), "LoRALabSaveCheckpoint")
        entry = server.run_prompt(api)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-4000:]
        lora_path, = entry["outputs"]["5"]["text"]
        trained[family] = (entry, lora_path)
    return trained


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_trains_the_shipped_graph_and_saves_into_loras(family, trained_in_comfyui, server):
    _, lora_path = trained_in_comfyui[family]
    assert lora_path == str(server.base / "models" / "loras" / "loralab" / f"my_{family}_lora_00001.safetensors")
    assert_diffusers_lora(lora_path)
    listed = server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert f"loralab/my_{family}_lora_00001.safetensors" in listed["lora_name"][0]
    assert not pack_trouble(server.log()), pack_trouble(server.log())


# -- ComfyUI's generation nodes on the saved LoRA, in ComfyUI's Python --------------------------------

GENERATE_SCRIPT = r'''
import asyncio, importlib, json, logging, sys
job = json.load(open(sys.argv[-1]))
sys.argv = ["check", "--cpu", "--base-directory", job["base"]]  # folder_paths: the server's models
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_detection, comfy.model_management, comfy.model_patcher, comfy.sd, comfy.supported_models
import comfy.text_encoders.llama
import nodes
from safetensors.torch import load_file

CLASSES = dict(nodes.NODE_CLASS_MAPPINGS)
for name in ("nodes_model_advanced", "nodes_sd3", "nodes_flux", "nodes_custom_sampler"):
    module = importlib.import_module("comfy_extras." + name)
    if hasattr(module, "NODE_CLASS_MAPPINGS"):
        CLASSES.update(module.NODE_CLASS_MAPPINGS)
    else:  # ComfyUI's V3 nodes
        extension = asyncio.run(module.comfy_entrypoint())
        CLASSES.update({c.GET_SCHEMA().node_id: c for c in asyncio.run(extension.get_node_list())})


def call(class_type, inputs):
    cls = CLASSES[class_type]
    if hasattr(cls, "GET_SCHEMA"):
        return cls.execute(**inputs).result
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def tiny_model(family):
    """ComfyUI's model of the family at the tiny widths, its weights random (seeded; matrices of
    torch's scale 1 / sqrt(fan in), norms 1, biases 0)."""
    config = getattr(comfy.supported_models, family["model_class"])(family["unet_config"])
    model = config.get_model({})
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            parameter.data.normal_(0, parameter[0].numel() ** -0.5)
        else:
            parameter.data.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


REAL_CONFIGS = {}


def tiny_text_encoder(text_encoder):
    """CLIPLoader as ComfyUI's own, with what its detection and its config assume at the real size
    (the model by the hidden width, the widths) given the tiny text encoder's."""
    name = text_encoder["config"]
    real = REAL_CONFIGS.setdefault(name, getattr(comfy.text_encoders.llama, name))

    def config(**values):
        made = real(**{**text_encoder["fields"], **values})
        made.head_dim = text_encoder["head_dim"]  # a class attribute of ComfyUI's config
        return made
    setattr(comfy.text_encoders.llama, name, config)
    comfy.sd.detect_te_model = lambda sd: comfy.sd.TEModel[text_encoder["model"]]


def run(family):
    """The graph's generation nodes from each SaveImage back, each once, as ComfyUI's classes."""
    api = family["graph"]
    torch.manual_seed(1)
    text = torch.randn([1] + family["text_shape"])
    lora = load_file(family["lora"])
    if family["unet_config_from_file"]:  # UNETLoader: ComfyUI's detection, the widths it assumes given
        model_class = getattr(comfy.supported_models, family["model_class"])
        comfy.model_detection.model_config_from_unet_config = lambda unet_config, *_: model_class(
            {**unet_config, **family["unet_config"]})
    if family["text_encoder"]:
        tiny_text_encoder(family["text_encoder"])
    done, ran, results = {}, set(), {}

    def value(node_id, slot):
        if node_id not in done:
            node = api[node_id]
            inputs = {k: value(*v) if isinstance(v, list) and v[0] in api else v for k, v in node["inputs"].items()}
            kind = node["class_type"]
            if kind == "UNETLoader" and not family["unet_config_from_file"]:
                out = (tiny_model(family),)
            elif kind == "CLIPLoader" and not family["text_encoder"]:
                out = (None,)  # ComfyUI builds Qwen2.5-VL's vision tower at its real size: prompts are tensors
            elif kind == "CLIPTextEncode" and not family["text_encoder"]:
                out = ([[text if inputs["text"] else torch.zeros_like(text), {}]],)
            elif kind == "VAELoader" and not family["decode"]:
                out = (None,)
            elif kind == "VAEDecode" and not family["decode"]:
                out = (inputs["samples"]["samples"],)  # the latent, not decoded
            elif kind == "LoRALabApplyLoRA":  # ApplyLoRA: ComfyUI's LoRA loading at the node's strength
                out = (comfy.sd.load_lora_for_models(inputs["model"], None, lora, inputs["strength"], 0)[0], None)
            else:
                out = call(kind, inputs)
                ran.add(kind)
            done[node_id] = out
        return done[node_id][slot]

    for node in api.values():
        if node["class_type"] == "SaveImage":
            results[node["inputs"]["filename_prefix"]] = value(*node["inputs"]["images"]).float().numpy().tolist()
    return {"results": results, "ran": sorted(ran)}


warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Catch()); logging.getLogger().setLevel(logging.WARNING)
with torch.inference_mode():  # as ComfyUI's executor runs nodes
    report = {name: run(family) for name, family in job["families"].items()}
print(json.dumps({"families": report, "warnings": warnings}))
'''


def qwen3_4b(preset, head_dim):
    """ComfyUI's Qwen3-4B config at a tiny model's text widths (its builder's head_dim)."""
    return {"config": "Qwen3_4BConfig", "model": "QWEN3_4B", "head_dim": head_dim, "fields": {
        "hidden_size": preset["text_dim"], "intermediate_size": 2 * preset["text_dim"],
        "num_hidden_layers": preset["text_layers"], "num_attention_heads": 2, "num_key_value_heads": 1}}


def generation_jobs():
    """What ComfyUI's model of each family is at the tiny widths (the tiny models' presets)."""
    from loralab.core.families.qwen_image.tiny import PRESET as QWEN

    z, q, f = ZIMAGE_COMFY_SHAPED, QWEN, FLUX2_COMFY_SHAPED
    return {
        "zimage": {"model_class": "ZImage", "unet_config_from_file": False, "decode": False,
                   "text_shape": [8, z["text_dim"]], "text_encoder": qwen3_4b(z, head_dim=16),
                   # as model_detection configures Z-Image at dim 3840, at the tiny sizes
                   "unet_config": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "qk_norm": True,
                                   "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
                                   "time_scale": 1000.0, "pad_tokens_multiple": 32, "dim": z["dim"],
                                   "n_layers": z["layers"], "n_heads": z["heads"], "n_kv_heads": z["heads"],
                                   "cap_feat_dim": z["text_dim"], "axes_dims": list(z["axes_dims"]),
                                   "axes_lens": [512, 64, 64]}},
        "qwen_image": {"model_class": "QwenImage", "unet_config_from_file": True, "decode": True,
                       "text_shape": [8, q["text_dim"]], "text_encoder": None,
                       "unet_config": {"attention_head_dim": q["head_dim"], "num_attention_heads": q["heads"],
                                       "joint_attention_dim": q["text_dim"], "axes_dims_rope": list(q["rope"])}},
        "flux2": {"model_class": "Flux2", "unet_config_from_file": True, "decode": False,
                  "text_shape": [8, 3 * f["text_dim"]], "text_encoder": qwen3_4b(f, head_dim=8),
                  # as model_detection configures a FLUX.2 transformer, at the tiny sizes
                  "unet_config": {"image_model": "flux2", "mlp_ratio": 3.0, "theta": 2000, "global_modulation": True,
                                  "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
                                  "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
                                  "patch_size": 1, "vec_in_dim": None, "guidance_embed": False, "yak_mlp": False,
                                  "txt_norm": False, "in_channels": 4 * f["latent_channels"],
                                  "out_channels": 4 * f["latent_channels"], "hidden_size": f["heads"] * f["head_dim"],
                                  "num_heads": f["heads"], "axes_dim": list(f["axes_dims"]),
                                  "context_in_dim": 3 * f["text_dim"], "depth": f["layers"],
                                  "depth_single_blocks": f["single_layers"]}},
    }


@pytest.fixture(scope="module")
def generated(trained_in_comfyui, server, tmp_path_factory):
    """ComfyUI's run of each shipped graph's generation half on the LoRA its training half saved."""
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    jobs = generation_jobs()
    for family in FAMILIES:
        api = on_server(with_tiny_values(shipped(family), family), family)
        jobs[family].update(lora=trained_in_comfyui[family][1], graph={
            i: n for i, n in api.items() if n["class_type"] not in NODES or n["class_type"] == "LoRALabApplyLoRA"})
    job = tmp_path_factory.mktemp("generate") / "job.json"
    job.write_text(json.dumps({"base": str(server.base), "families": jobs}))
    done = subprocess.run([python, "-c", GENERATE_SCRIPT, str(job)], cwd=comfyui, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


COMFYUI_RAN = {
    "zimage": ["CLIPLoader", "CLIPTextEncode", "EmptySD3LatentImage", "KSampler", "ModelSamplingAuraFlow"],
    "qwen_image": ["EmptySD3LatentImage", "KSampler", "ModelSamplingAuraFlow", "UNETLoader", "VAEDecode", "VAELoader"],
    "flux2": ["CFGGuider", "CLIPLoader", "CLIPTextEncode", "EmptyFlux2LatentImage", "Flux2Scheduler", "KSamplerSelect", "RandomNoise",
              "SamplerCustomAdvanced", "UNETLoader"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyuis_sampling_nodes_generate_differently_at_strength_0_and_1(family, generated):
    report = generated["families"][family]
    assert report["ran"] == COMFYUI_RAN[family]
    base, lora = (np.asarray(report["results"][f"loralab/{family}_strength_{s}"]) for s in (0, 1))
    assert np.isfinite(base).all() and np.isfinite(lora).all()
    if family == "qwen_image":  # decoded by ComfyUI's VAE: images of the graph's size
        assert base.shape == (1, SIZE, SIZE, 3)
    # the LoRA changed what was generated: most values, not a stray rounding
    changed = np.abs(base - lora) > 1e-3 * np.abs(base).mean()
    assert changed.mean() > 0.25, (changed.mean(), np.abs(base - lora).mean(), np.abs(base).mean())
    # ComfyUI's LoRA loading took every key of the file and found every module it names; CLIPLoader
    # found every weight of its text encoder in the file; UNETLoader every weight of its model, and
    # no other ("unet missing" / "unet unexpected")
    assert not [w for w in generated["warnings"] if "not loaded" in w.lower() or "missing" in w or "unexpected" in w], \
        generated["warnings"]
