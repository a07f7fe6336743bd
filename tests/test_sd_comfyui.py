"""ComfyUI's own code reads our SD1.5 / SDXL files: run in ComfyUI's Python (env
LORALAB_COMFYUI_PYTHON; ComfyUI's source at LORALAB_COMFYUI or ../shared/comfyui), skipped
otherwise (a failure with LORALAB_REQUIRE_COMFYUI=1, see comfyui_env.py).

ComfyUI's checkpoint detection only accepts the real widths, so the tiny checkpoint is checked
with its parts: comfy.model_detection.detect_unet_config finds the tiny UNet's structure,
comfy.utils.unet_to_diffusers (ComfyUI's own diffusers <-> LDM map) sends every UNet key of our
file to the folder's equal tensor, ComfyUI's UNet built at the tiny size by its own SD15 / SDXL
classes takes the file's UNet with no key missing or left over, and comfy.lora's key maps use
every key of our kohya LoRA, patching each weight by exactly the delta of our peft LoRA. The
real SD1.5 / SDXL-base UNets in our layout (shapes only, meta tensors) are named SD15 / SDXL by
ComfyUI's model detection."""
import json
import os
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.core.families.unet import keys

from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source
from test_sd_files import FAMILIES, peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = COMFYUI_HEAD + r'''
jobs, shape_jobs = job

reports = {}
for args in jobs:
    sd = load_file(args["checkpoint"])
    prefix = "model.diffusion_model."
    config = comfy.model_detection.detect_unet_config(sd, prefix)
    report = reports[args["family"]] = {
        "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, list, type(None)))}}

    # ComfyUI's diffusers <-> LDM map: every UNet key of our file from the folder's equal tensor
    folder = load_file(args["folder_unet"])
    to_ldm = comfy.utils.unet_to_diffusers(config)
    from_ldm = {v: k for k, v in to_ldm.items() if k in folder}  # label_emb: both class_ and add_embedding
    unet_keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    report["unmapped"] = [k for k in unet_keys if k not in from_ldm]
    report["unequal"] = [k for k in unet_keys
                         if k in from_ldm and not torch.equal(sd[prefix + k], folder[from_ldm[k]])]
    report["folder_keys_unmapped"] = sorted(set(folder) - set(from_ldm.values()))

    # ComfyUI's UNet at the tiny size, by its own model class: ours loads, no key missing or left over
    classes = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}
    model_config = classes[args["family"]](config)
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(
        {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
    report["missing"], report["unexpected"] = list(missing), list(unexpected)

    # LoRA: ComfyUI's key maps (UNet: the model; text encoders: ComfyUI's own CLIP classes, meta device)
    clip_class = comfy.sd1_clip.SD1ClipModel if args["family"] == "sd15" else comfy.sdxl_clip.SDXLClipModel
    clip = clip_class(device="meta")
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    weights = model.diffusion_model.state_dict()
    report["loras"] = {}
    for name, path in args["loras"].items():
        warnings.clear()
        lora = comfy.lora_convert.convert_lora(load_file(path))
        patches = comfy.lora.load_lora(lora, key_map)
        deltas = {}
        for target, patch in patches.items():
            ldm = target[len("diffusion_model."):] if target.startswith("diffusion_model.") else None
            if ldm in weights:
                base = weights[ldm].float()
                patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), target)
                deltas["unet." + from_ldm[ldm]] = (patched - base).contiguous()
            else:  # a text encoder weight (meta): its name is what is checked
                deltas[target] = torch.zeros(1)
        save_file(deltas, path + ".deltas.safetensors")
        report["loras"][name] = {"not_loaded": [w for w in warnings if "not loaded" in w],
                                 "patched": len(patches)}

# the real architectures' key layout (shapes only, on the meta device): ComfyUI names the model
for family, shapes in shape_jobs.items():
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    found = comfy.model_detection.model_config_from_unet_config(config, sd)
    reports["real_" + family] = type(found).__name__
print(json.dumps(reports))
'''


def _run_comfyui(args, folder):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    with open(folder / "jobs.json", "w") as f:
        json.dump(args, f)
    result = subprocess.run([python, "-c", SCRIPT, str(folder / "jobs.json")], cwd=comfyui, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui),
                                                         "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _expected_deltas(weights):
    """{unet.<diffusers module>.weight: B @ A} of the UNet's peft LoRA (conv: as a kernel)."""
    deltas = {}
    for key, down in weights.items():
        if key.endswith(".lora_A.weight") and not key.startswith("text_encoder"):
            module = key[:-len(".lora_A.weight")]
            up = weights[module + ".lora_B.weight"]
            delta = up.flatten(1) @ down.flatten(1)
            deltas[f"unet.{module}.weight"] = delta.reshape(up.shape[0], *down.shape[1:])
    return deltas


def _lora_files(family, folder, out):
    """The LoRA files of one family for ComfyUI to read: (job, peft weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
             "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")}
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    weights = peft_lora(type("Parts", (), parts)(), family)
    unet_weights = {k: v for k, v in weights.items() if not k.startswith("text_encoder")}
    text_weights = {k: v for k, v in weights.items() if k.startswith("text_encoder")}
    out.mkdir()
    loras = {name: str(out / f"{name}.safetensors")
             for name in ("kohya", "diffusers", "diffusers_unet_prefixed", "text")}
    save_file(keys.lora_to_kohya(unet_weights, family, parts["unet"].config), loras["kohya"])
    save_file(keys.lora_to_diffusers(unet_weights), loras["diffusers"])  # our diffusers format
    save_file({"unet." + k: v.contiguous() for k, v in unet_weights.items()}, loras["diffusers_unet_prefixed"])
    save_file(keys.lora_to_kohya(text_weights, family), loras["text"])
    if family == "sdxl":  # kohya's names for SDXL are LDM ones; diffusers module names also map
        loras["kohya_diffusers_names"] = str(out / "kohya_diffusers_names.safetensors")
        save_file(keys.lora_to_kohya(unet_weights, "sd15"), loras["kohya_diffusers_names"])
    job = {"family": family, "checkpoint": None, "loras": loras,
           "folder_unet": os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")}
    return job, parts["unet"].config, unet_weights, text_weights


def _check_unet(config, unet_config, report):
    levels = len(unet_config.block_out_channels)
    assert config["model_channels"] == unet_config.block_out_channels[0]
    assert config["channel_mult"] == [c // unet_config.block_out_channels[0] for c in unet_config.block_out_channels]
    assert config["num_res_blocks"] == [unet_config.layers_per_block] * levels
    assert config["context_dim"] == unet_config.cross_attention_dim
    assert config["use_linear_in_transformer"] == unet_config.use_linear_projection
    assert config["adm_in_channels"] == unet_config.projection_class_embeddings_input_dim
    depths = unet_config.transformer_layers_per_block
    depths = [depths] * levels if isinstance(depths, int) else depths
    assert config["transformer_depth"] == [d if t.startswith("CrossAttn") else 0 for d, t in
                                           zip(depths, unet_config.down_block_types)
                                           for _ in range(unet_config.layers_per_block)]
    assert config["transformer_depth_middle"] == depths[-1]
    assert report["unmapped"] == [] and report["unequal"] == [] and report["folder_keys_unmapped"] == []
    assert report["missing"] == [] and report["unexpected"] == []


def _check_loras(family, loras, report, unet_weights, text_weights):
    modules = sum(k.endswith(".lora_A.weight") for k in unet_weights)
    # diffusers' peft names with a `unet.` prefix: ComfyUI maps attention projections only by the
    # old attention-processor names (attn1.processor.to_q), so those are left out: why our
    # diffusers format (checked with the others below) uses those names
    attention = {f"unet.{k[:-len('.lora_A.weight')]}.weight" for k in unet_weights
                 if re.search(r"\.to_(q|k|v|out\.0)\.lora_A\.weight$", k)}
    assert attention
    not_loaded = {re.sub(r"^lora key not loaded: |\.lora_[AB]\.weight$", "", w) + ".weight"
                  for w in report["diffusers_unet_prefixed"]["not_loaded"]}
    assert not_loaded == attention
    assert report.pop("diffusers_unet_prefixed")["patched"] == modules - len(attention)

    # text encoders: every lora_te_ / lora_te1_ / lora_te2_ module lands on ComfyUI's CLIP-L / CLIP-G
    text_modules = sum(k.endswith(".lora_A.weight") for k in text_weights)
    assert report.pop("text") == {"not_loaded": [], "patched": text_modules}
    targets = load_file(loras["text"] + ".deltas.safetensors")
    assert {t.split(".")[0] for t in targets} == {"sd15": {"clip_l"}, "sdxl": {"clip_l", "clip_g"}}[family]

    expected = _expected_deltas(unet_weights)
    for name in report:
        assert report[name] == {"not_loaded": [], "patched": modules}, name
        deltas = load_file(loras[name] + ".deltas.safetensors")
        assert sorted(deltas) == sorted(expected), name
        for key, delta in expected.items():
            torch.testing.assert_close(deltas[key], delta, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def _real_shapes(family):
    """{checkpoint UNet key: shape} of the real SD1.5 / SDXL-base UNet (packaged config), in our layout."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(keys.real_unet_config(family))
    state = unet.state_dict()
    return {keys.UNET_PREFIX + ldm: list(state[d].shape) for d, ldm in keys.unet_to_ldm(state, unet.config).items()}


def test_comfyui_reads_our_checkpoints_and_loras(tiny_sd, tmp_path):
    jobs, expected = [], {}
    for family in FAMILIES:
        folder, checkpoint, _ = tiny_sd[family]
        job, unet_config, unet_weights, text_weights = _lora_files(family, folder, tmp_path / family)
        jobs.append({**job, "checkpoint": checkpoint})
        expected[family] = (job["loras"], unet_config, unet_weights, text_weights)
    reports = _run_comfyui([jobs, {family: _real_shapes(family) for family in FAMILIES}], tmp_path)
    assert (reports["real_sd15"], reports["real_sdxl"]) == ("SD15", "SDXL")
    for family, (loras, unet_config, unet_weights, text_weights) in expected.items():
        _check_unet(reports[family]["config"], unet_config, reports[family])
        _check_loras(family, loras, reports[family]["loras"], unet_weights, text_weights)
