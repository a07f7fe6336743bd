"""The node classes as ComfyUI calls them: INPUT_TYPES, FUNCTION, return tuples, IMAGE layout,
widget defaults from the schema; SaveCheckpoint's path rules; SampleGrid's grid; and the
ComfyUI-only behaviour against stand-ins of ComfyUI's modules."""
import importlib.util
import inspect
import os
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import loralab
from loralab.core.config import ConfigError, defaults, field, resolve
from loralab.nodes import comfy_adapter
from loralab.nodes.schema_widgets import config_from
from loralab.nodes.values import TrainedLoRA

NODES = loralab.NODE_CLASS_MAPPINGS
FAST_SETTINGS = {"steps": 12, "lr": 1e-3, "optimizer": "adamw", "sample_every": 0,
                 "train_dtype": "fp32", "gradient_checkpointing": False, "linear": 8,
                 "performance_log_every": 4, "sample_width": 64, "sample_height": 64,
                 "sample_steps": 2}


def call(class_type, **inputs):
    """What ComfyUI does: instantiate, call FUNCTION under torch.inference_mode(), unwrap
    {"ui", "result"}; checks the tuple against RETURN_TYPES."""
    node_class = NODES[class_type]
    with torch.inference_mode():
        returned = getattr(node_class(), node_class.FUNCTION)(**inputs)
    if isinstance(returned, dict):
        returned = returned["result"]
    assert isinstance(returned, tuple) and len(returned) == len(node_class.RETURN_TYPES)
    return returned


def widget_defaults(class_type):
    declared = NODES[class_type].INPUT_TYPES()
    return {name: spec[1]["default"] for section in ("required", "optional")
            for name, spec in declared.get(section, {}).items()
            if len(spec) > 1 and "default" in spec[1]}


def assert_comfy_image(image):
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[-1] == 3
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0


# -- as ComfyUI reads the classes ------------------------------------------------------------------

def test_every_design_node_is_registered_with_a_display_name():
    design = {"LoRALabLoadDataset", "LoRALabLoadBaseModel", "LoRALabConfigureLoRA",
              "LoRALabTrainLoRA", "LoRALabSaveCheckpoint", "LoRALabSampleGrid", "LoRALabApplyLoRA"}
    assert design <= set(NODES)
    assert set(loralab.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert all(name.startswith("LoRA Lab: ") for name in loralab.NODE_DISPLAY_NAME_MAPPINGS.values())


def test_importing_the_pack_does_not_import_comfyui():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


def test_the_folder_loads_under_another_name_as_comfyui_loads_custom_nodes():
    root = os.path.dirname(loralab.__file__)
    spec = importlib.util.spec_from_file_location(
        "comfyui-loralab", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert sorted(module.NODE_CLASS_MAPPINGS) == sorted(NODES)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == spec.name]:
            del sys.modules[name]


def test_load_dataset_changes_when_the_folder_does(demo_dataset, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(demo_dataset, folder)
    monkeypatch.setenv("LORALAB_INPUT", str(tmp_path))
    before = NODES["LoRALabLoadDataset"].IS_CHANGED(folder="data")
    (folder / "image_000.txt").write_text("a new caption, longer than before")
    assert NODES["LoRALabLoadDataset"].IS_CHANGED(folder="data") != before


@pytest.mark.parametrize("class_type", sorted(NODES))
def test_node_class_has_the_v1_shape(class_type):
    node_class = NODES[class_type]
    declared = node_class.INPUT_TYPES()
    assert set(declared) <= {"required", "optional", "hidden"} and declared["required"]
    names = []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            assert isinstance(spec, tuple) and isinstance(spec[0], (str, list)), name
            if len(spec) > 1:
                assert isinstance(spec[1], dict)
            if isinstance(spec[0], list):  # a COMBO's default is one of its choices
                assert spec[1]["default"] in spec[0]
            names.append(name)
    function = getattr(node_class(), node_class.FUNCTION)
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    assert takes_any or set(names) <= set(parameters), "FUNCTION must take every input"
    assert all(p.default is not p.empty for n, p in parameters.items()
               if n in declared.get("optional", {}))
    assert isinstance(node_class.RETURN_TYPES, tuple)
    assert len(node_class.RETURN_NAMES) == len(node_class.RETURN_TYPES)
    assert node_class.CATEGORY == "LoRA Lab"


@pytest.mark.parametrize("class_type", ["LoRALabLoadDataset", "LoRALabLoadBaseModel",
                                        "LoRALabConfigureLoRA", "LoRALabTrainLoRA",
                                        "LoRALabSampleGrid"])
def test_widgets_carry_the_schema_defaults_ranges_and_tooltips(class_type):
    node_class = NODES[class_type]
    declared = node_class.INPUT_TYPES()["required"]
    for name, setting in node_class.SETTINGS.items():
        schema, options = field(setting.path), declared[name][1]
        assert options["tooltip"].startswith(schema["description"]), name
        if schema.get("default") is not None and not isinstance(schema["default"], list):
            assert options["default"] == schema["default"], name
        if "maximum" in schema:
            assert options["max"] == schema["maximum"], name
        if "enum" in schema:  # a combo lists strings: true/false for the booleans beside "auto"
            shown = [str(c).lower() if isinstance(c, bool) else c for c in schema["enum"] if c is not None]
            assert declared[name][0] == shown


def test_widget_defaults_resolve_to_the_config_defaults():
    """One schema: every node's default widgets, turned back into a config, are the defaults."""
    raw = {}
    for class_type in ("LoRALabLoadDataset", "LoRALabLoadBaseModel", "LoRALabConfigureLoRA",
                       "LoRALabTrainLoRA", "LoRALabSampleGrid"):
        node_class = NODES[class_type]
        for section, values in config_from(node_class.SETTINGS, widget_defaults(class_type)).items():
            raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    raw["model"]["path"], raw["dataset"]["folder"] = "builtin:tiny-flux", "y"
    resolved = resolve(raw)
    expected = resolve({"model": {"path": "builtin:tiny-flux"}, "dataset": {"folder": "y"}})
    assert resolved == expected
    assert resolved["train"]["steps"] is None and resolved["sample"]["prompts"] == defaults()[
        "sample"]["prompts"]


def test_bad_widget_values_name_the_config_key(demo_dataset):
    with pytest.raises(ConfigError, match="dataset.resolution"):
        call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                      "folder": "demo", "resolution": "512,big"})
    with pytest.raises(ConfigError, match="train.lr"):
        call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"), "lr": 3.0})


def test_the_family_is_read_from_the_files_and_a_wrong_one_is_refused(tiny_flux):
    from loralab.core.families import NAMES

    assert NODES["LoRALabLoadBaseModel"].INPUT_TYPES()["required"]["family"][0] == ["auto", *NAMES]
    assert {"flux", "sdxl", "sd15", "zimage", "qwen_image"} <= set(NAMES)
    assert resolve({"model": {"path": tiny_flux}, "dataset": {"folder": "x"}})["model"]["family"] == "flux"
    with pytest.raises(ConfigError, match="model.family = sdxl, but model.path .* is a flux model"):
        resolve({"model": {"family": "sdxl", "path": tiny_flux}, "dataset": {"folder": "x"}})
    with pytest.raises(ValueError, match="is a flux model"):  # a node called directly
        call("LoRALabLoadBaseModel", family="sdxl", path="tiny-flux", dtype="fp32", quantize="none")
    problem = NODES["LoRALabLoadBaseModel"].VALIDATE_INPUTS(path="FLUX.1-dev")
    assert "model folder 'FLUX.1-dev' not found in ComfyUI's diffusers folders" in problem
    assert "is an absolute path" in NODES["LoRALabLoadBaseModel"].VALIDATE_INPUTS(path="/nowhere/FLUX.1-dev")
    assert NODES["LoRALabLoadBaseModel"].VALIDATE_INPUTS(path="builtin:tiny-flux") is True


def test_dataset_report_counts_images_and_gives_the_guides_steps(demo_dataset):
    dataset, report = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                                   "folder": "demo", "repeats": 2})
    assert dataset.section["repeats"] == 2 and dataset.section["resolution"] == [512, 768, 1024]
    assert "images: 6 found" in report and "6 images x 2 repeats / batch 1 = 12" in report
    assert "at least 15-20" in report  # the guide's advice for a small dataset


# -- SaveCheckpoint's file names -------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["../outside", "loralab/../../outside", "/tmp/absolute", ""])
def test_save_checkpoint_refuses_a_prefix_that_leaves_the_loras_folder(prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = NODES["LoRALabSaveCheckpoint"].VALIDATE_INPUTS(filename_prefix=prefix)
    assert problem is not True and "filename_prefix" in problem
    lora = TrainedLoRA("x", {}, {}, 0, "finished", "", "")
    with pytest.raises(ValueError, match="filename_prefix"):
        call("LoRALabSaveCheckpoint", lora=lora, filename_prefix=prefix, dtype="float16",
             format="diffusers")
    assert not os.path.exists(tmp_path / "output")


# -- a real (tiny) training through the nodes ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_flux, demo_dataset, tmp_path_factory):
    """LoadBaseModel -> LoadDataset -> ConfigureLoRA -> TrainLoRA, once for this module; the
    working folder (./output) stays a temporary one while the module runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("nodes"))
        base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                     quantize="none")
        dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                                  "folder": "demo", "trigger_word": "sks",
                                                  "resolution": "64"})
        config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"),
                                                 **FAST_SETTINGS})
        lora, plot, summary = call("LoRALabTrainLoRA", base_model=base, dataset=dataset,
                                   config=config, name="node_lora", resume=True)
        yield types.SimpleNamespace(base=base, lora=lora, plot=plot, summary=summary)


def test_train_returns_the_lora_a_loss_plot_image_and_a_summary(trained):
    assert trained.lora.status == "finished" and trained.lora.step == 12
    assert os.path.isfile(trained.lora.lora_path)
    assert os.path.dirname(trained.lora.run_folder) == os.path.abspath("output")
    assert_comfy_image(trained.plot)
    assert trained.plot.shape[0] == 1 and trained.plot.shape[2] > trained.plot.shape[1]
    assert "finished: step 12 of 12" in trained.summary


def test_save_checkpoint_writes_numbered_files_in_the_loras_folder(trained):
    first, = call("LoRALabSaveCheckpoint", lora=trained.lora, filename_prefix="loralab/[name]",
                  dtype="float16", format="diffusers")
    second, = call("LoRALabSaveCheckpoint", lora=trained.lora, filename_prefix="loralab/[name]",
                   dtype="float32", format="kohya")
    loras = os.path.abspath(os.path.join("output", "loras", "loralab"))
    assert first == os.path.join(loras, "node_lora_00001.safetensors")
    assert second == os.path.join(loras, "node_lora_00002.safetensors")
    diffusers, kohya = load_file(first), load_file(second)
    assert all(k.startswith("transformer.") for k in diffusers)
    assert {v.dtype for v in diffusers.values()} == {torch.float16}
    assert all(k.startswith("lora_unet_") for k in kohya)


def test_save_checkpoint_can_pin_the_step_checkpoint_out_of_rotation(trained):
    from loralab.core.runs import RunFolder

    run = RunFolder(*os.path.split(trained.lora.run_folder))
    assert run.pinned() == []
    call("LoRALabSaveCheckpoint", lora=trained.lora, filename_prefix="pinned/[name]",
         dtype="float16", format="diffusers", pin=True)
    assert run.pinned() == [12]
    run.pin(12, pinned=False)


def test_sample_grid_is_prompts_by_strengths_and_strength_0_is_the_base_model(trained):
    prompts = "a photo of sks\nsks on grass"  # no [trigger]: the base grid has no trigger word
    sample = dict(seed=7, steps=2, guidance=4.0, width=64, height=64)
    base, = call("LoRALabSampleGrid", base_model=trained.base, prompts=prompts, strengths="0",
                 **sample)
    two, = call("LoRALabSampleGrid", base_model=trained.base, lora=trained.lora, prompts=prompts,
                strengths="0,1", **sample)
    three, = call("LoRALabSampleGrid", base_model=trained.base, lora=trained.lora,
                  prompts="a photo of [trigger]", strengths="0,0.5,1", **sample)
    for grid in (base, two, three):
        assert_comfy_image(grid)
        assert grid.shape[0] == 1
    assert two.shape[2] - base.shape[2] == 64          # one more column
    assert three.shape[2] - two.shape[2] == 64         # and another
    assert two.shape[1] - three.shape[1] == 64         # two prompts: one more row
    cells = two[0, -128:, -128:]                       # rows x columns, bottom right
    base_cells = base[0, -128:, -64:]
    assert torch.equal(cells[:, :64], base_cells)      # strength 0 is the base model
    assert not torch.equal(cells[:, 64:], base_cells)  # strength 1 is not
    saved = os.path.join("output", "node_lora")
    assert sorted(n for n in os.listdir(saved) if n.startswith("grid_")) == [
        "grid_00001.png", "grid_00002.png"]


def test_apply_lora_says_it_needs_comfyui(trained):
    with pytest.raises(RuntimeError, match="inside ComfyUI"):
        call("LoRALabApplyLoRA", model=object(), lora=trained.lora, strength=1.0)


# -- inside ComfyUI (its modules stood in for) ----------------------------------------------------

class InterruptProcessingException(BaseException):
    pass


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    """Stand-ins of the ComfyUI functions the adapter calls, recording what they get."""
    seen = types.SimpleNamespace(progress=[], patched=[], interrupt_at=None, interrupted=False,
                                 unloaded=[])
    models = tmp_path / "models"

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            seen.progress.append((value, total, preview))
            if seen.interrupt_at is not None and value >= seen.interrupt_at:
                seen.interrupted = True  # the user presses Cancel at this step

    def throw_exception_if_processing_interrupted():
        if seen.interrupted:
            seen.interrupted = False
            raise InterruptProcessingException()

    def folder(kind):
        return str(models / {"unet": "diffusion_models"}.get(kind, kind))

    modules = {
        "comfy": types.ModuleType("comfy"),
        "comfy.utils": types.SimpleNamespace(ProgressBar=ProgressBar),
        "comfy.cli_args": types.SimpleNamespace(args=types.SimpleNamespace(preview_size=256)),
        "comfy.model_management": types.SimpleNamespace(
            processing_interrupted=lambda: seen.interrupted,
            throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
            get_torch_device=lambda: torch.device("cpu"),
            unload_all_models=lambda: seen.unloaded.append(len(seen.progress)),
            soft_empty_cache=lambda: seen.progress.append("freed")),
        "comfy.sd": types.SimpleNamespace(load_lora_for_models=lambda model, clip, lora, sm, sc: (
            seen.patched.append((model, lora, sm, sc)) or ("patched", model), None)),
        "folder_paths": types.SimpleNamespace(
            get_output_directory=lambda: str(tmp_path / "comfy_output"),
            get_input_directory=lambda: os.environ["LORALAB_INPUT"],  # the session's input folder
            # a second diffusers folder (extra_model_paths.yaml) holds the session's tiny-flux
            get_folder_paths=lambda kind: [folder(kind)] + (
                [os.path.join(os.environ["LORALAB_MODELS"], kind)] if kind == "diffusers" else []),
            get_filename_list=lambda kind: sorted(os.listdir(folder(kind)))),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    comfy_adapter._comfy.cache_clear()
    for kind in ("diffusers/FLUX.1-dev", "diffusion_models", "text_encoders", "vae", "loras", "checkpoints"):
        (models / kind).mkdir(parents=True)
    (models / "diffusers" / "FLUX.1-dev" / "model_index.json").write_text("{}")
    for name in ("diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors",
                 "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors",
                 "checkpoints/sd_xl_base_1.0.safetensors"):
        (models / name).write_bytes(b"")
    yield seen
    comfy_adapter._comfy.cache_clear()


def test_comfyui_model_folders_are_listed_and_a_non_empty_path_wins(comfyui, tiny_flux, tmp_path):
    optional = NODES["LoRALabLoadBaseModel"].INPUT_TYPES()["optional"]
    assert optional["comfyui_model"][0] == ["none", "diffusers/FLUX.1-dev", "diffusers/tiny-flux"]
    assert optional["diffusion_model"][0] == ["none", "flux1-dev.safetensors"]
    assert optional["clip_l"][0] == optional["t5"][0] == ["none", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert optional["vae"][0] == ["none", "ae.safetensors"]
    assert optional["checkpoint"][0] == ["none", "sd_xl_base_1.0.safetensors"]
    load = NODES["LoRALabLoadBaseModel"].model_section
    assert load("flux", "", "diffusers/FLUX.1-dev")["path"] == str(
        tmp_path / "models" / "diffusers" / "FLUX.1-dev")
    assert load("flux", "tiny-flux", "diffusers/FLUX.1-dev")["path"] == tiny_flux
    single = load("flux", "tiny-flux", diffusion_model="flux1-dev.safetensors")
    assert single["transformer_path"] == str(tmp_path / "models" / "diffusion_models" / "flux1-dev.safetensors")
    four = load("flux", "", diffusion_model="flux1-dev.safetensors", clip_l="clip_l.safetensors",
                t5="t5xxl_fp16.safetensors", vae="ae.safetensors")
    assert four["path"] is None and four["vae_path"].endswith("vae/ae.safetensors")
    with pytest.raises(ValueError, match="model.clip_l_path, model.t5_path, model.vae_path not given"):
        call("LoRALabLoadBaseModel", family="flux", path="", dtype="bf16", quantize="none",
             diffusion_model="flux1-dev.safetensors")
    with pytest.raises(ValueError, match="vae: 'nothing.safetensors' is not in ComfyUI's vae folders"):
        load("flux", "tiny-flux", vae="nothing.safetensors")
    # Qwen-Image's text encoder: its own widget, after the SD settings (saved workflows keep their order)
    assert list(optional)[-2:] == ["text_encoder", "encode_on"]  # model.encode_on came later still
    assert optional["text_encoder"][0] == optional["t5"][0]
    qwen = load("qwen_image", "", diffusion_model="flux1-dev.safetensors", text_encoder="t5xxl_fp16.safetensors",
                vae="ae.safetensors")
    assert qwen["text_encoder_path"] == str(tmp_path / "models" / "text_encoders" / "t5xxl_fp16.safetensors")


def test_inside_comfyui_the_pipeline_is_loaded_moved_and_trained_outside_inference_mode(
        comfyui, tiny_flux, demo_dataset, monkeypatch):
    """ComfyUI runs nodes under torch.inference_mode(). A weight loaded or moved to another
    device there becomes an inference tensor, which a later TrainLoRA cannot train on."""
    moves = []  # every module move (the pipeline's and the trainer's own), in or out of inference mode
    move = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, *args, **kwargs: (
        moves.append(torch.is_inference_mode_enabled()), move(module, *args, **kwargs))[1])
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"),
                                             **FAST_SETTINGS, "steps": 2})
    call("LoRALabSampleGrid", base_model=base, prompts="a photo", strengths="0", seed=1,
         steps=1, guidance=4.0, width=64, height=64)  # loads the pipeline, moves it twice
    lora, _, _ = call("LoRALabTrainLoRA", base_model=base, dataset=dataset, config=config,
                      name="inference_mode", resume=True)
    assert lora.status == "finished"
    assert len(moves) >= 4 and not any(moves)
    assert not any(p.is_inference() for p in base.pipeline().transformer.parameters())


def test_inside_comfyui_training_shows_progress_stops_on_cancel_and_resumes(
        comfyui, tiny_flux, demo_dataset, tmp_path):
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none")
    dataset, _ = call("LoRALabLoadDataset", **{**widget_defaults("LoRALabLoadDataset"),
                                              "folder": "demo", "resolution": "64"})
    config, = call("LoRALabConfigureLoRA", **{**widget_defaults("LoRALabConfigureLoRA"),
                                             **FAST_SETTINGS, "steps": 5, "sample_every": 2})
    inputs = dict(base_model=base, dataset=dataset, config=config, name="cancelled", resume=True)
    comfyui.interrupt_at = 3
    with pytest.raises(InterruptProcessingException):
        call("LoRALabTrainLoRA", **inputs)
    run = tmp_path / "comfy_output" / "cancelled"
    assert (run / "cancelled_000000003.safetensors").is_file()  # saved at the step it stopped
    assert not (run / "cancelled.safetensors").exists()
    assert comfyui.progress.pop() == "freed"  # the GPU goes back to ComfyUI after training
    assert comfyui.unloaded[0] == 0  # ComfyUI's models were unloaded before training began
    previews = [p for _, _, p in comfyui.progress if p is not None]
    assert previews and all(p[0] == "JPEG" and isinstance(p[1], Image.Image) and p[2] == 256
                            for p in previews)
    assert [v for v, _, p in comfyui.progress if p is None][:4] == [0, 1, 2, 3]

    comfyui.interrupt_at = None
    lora, _, summary = call("LoRALabTrainLoRA", **inputs)  # queued again: resumes at step 3
    assert lora.status == "finished" and lora.step == 5 and "step 5 of 5" in summary
    assert comfyui.progress[-2][0] == 5 and comfyui.progress[-1] == "freed"

    path, = call("LoRALabSaveCheckpoint", lora=lora, filename_prefix="mine/[name]",
                 dtype="float16", format="diffusers")
    assert path == str(tmp_path / "models" / "loras" / "mine" / "cancelled_00001.safetensors")

    model, clip = call("LoRALabApplyLoRA", model="comfy MODEL", lora=lora, strength=0.8)
    (given, tensors, strength, clip_strength), = comfyui.patched
    assert model == ("patched", "comfy MODEL") and (strength, clip_strength) == (0.8, 0)
    assert clip is None  # no CLIP given: a FLUX LoRA has no text-encoder part to put on it
    assert tensors.keys() == load_file(path).keys()
