"""network.type lokr / loha and network.dora: peft's adapters, written as files that ComfyUI's own
loader (comfy.lora's key maps, load_lora, calculate_weight, its weight adapters) reads with every
key used and exactly peft's merged weights, on tiny FLUX.1 (kohya and diffusers names) and SD1.5
(kohya names). Run in ComfyUI's Python (env LORALAB_COMFYUI_PYTHON), skipped otherwise."""
import json
import os
import re
import subprocess

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from loralab.core.config.load import ConfigError, resolve, with_defaults
from loralab.core.families import get_family
from loralab.core.families.flux.keys import transformer_to_bfl
from loralab.core.families.unet import keys as unet_keys
from loralab.core.lora import add_lora, file_tensors, lora_weights

from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source

pytestmark = pytest.mark.usefixtures("one_thread")

NETWORKS = {
    "lokr": {"type": "lokr", "lokr_factor": -1, "lokr_full_rank": False},
    "lokr_full": {"type": "lokr", "lokr_factor": 4, "lokr_full_rank": True},
    "loha": {"type": "loha"},
    "dora": {"type": "lora", "dora": True},
}

SCRIPT = COMFYUI_HEAD + r'''
jobs = job

reports = {}
for job in jobs:
    base = load_file(job["base"])
    prefix = "model.diffusion_model."
    config = comfy.model_detection.detect_unet_config(base, prefix)
    if job["family"] == "flux":
        config.update(job["flux_config"])
        model = comfy.supported_models.Flux(config).get_model({}, device="meta")
    else:
        model = comfy.supported_models.SD15(config).get_model({}, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    warnings.clear()
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(job["lora"])), key_map)
    by_target = {}
    for target, adapter in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        by_target.setdefault(key, []).append((1.0, adapter, 1.0, offset, None))
    patched = {}
    for key, entries in by_target.items():
        weight = base["model." + key].float()
        patched[key] = comfy.lora.calculate_weight(entries, weight.clone(), key).contiguous()
    save_file(patched, job["lora"] + ".patched.safetensors")
    reports[job["name"]] = {"not_loaded": [w for w in warnings if "not loaded" in w], "patched": len(patches)}
print(json.dumps(reports))
'''


def _perturbed(model, seed):
    """Every adapter tensor random (peft starts one factor at zero): deltas of every factor show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1
                                + (1.0 if "magnitude" in name else 0.0) * parameter)


def _merged(model):
    """{diffusers key: weight} of the modules with an adapter, merged by peft itself."""
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["default"])
            merged[name + ".weight"] = module.get_base_layer().weight.detach().float().clone()
            module.unmerge()
    return merged


def _network(kind, family):
    return with_defaults({"network": {"linear": 4, "linear_alpha": 2, **NETWORKS[kind]}})["network"]


def _flux_job(model, folder, name, network, fmt):
    config = model.config
    layers = (config.num_layers, config.num_single_layers)
    to_ldm = lambda state: {"model.diffusion_model." + k: v.float().contiguous()
                            for k, v in transformer_to_bfl(state, *layers).items()}
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
            if not any(a in k for a in ("lora_", "lokr_", "hada_"))}
    family = get_family("flux")
    tensors = file_tensors(lora_weights(model), network, fmt, "float32",
                           to_kohya=family.lora_to_kohya(model), to_diffusers=family.lora_to_diffusers)
    merged = to_ldm({**base, **_merged(model)})
    expected = {k[len("model."):]: v for k, v in merged.items() if not torch.equal(v, to_ldm(base)[k])}
    flux_config = {"axes_dim": list(config.axes_dims_rope), "num_heads": config.num_attention_heads,
                   "patch_size": 1, "in_channels": config.in_channels,
                   "out_channels": config.out_channels or config.in_channels}
    return tensors, to_ldm(base), expected, {"family": "flux", "flux_config": flux_config}


def _sd_job(unet, folder, name, network, fmt):
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
            if not any(a in k for a in ("lora_", "lokr_", "hada_"))}
    ldm = unet_keys.unet_to_ldm(base, unet.config)
    family = get_family("sd15")
    tensors = file_tensors(lora_weights(unet), network, fmt, "float32",
                           to_kohya=family.lora_to_kohya(unet), to_diffusers=family.lora_to_diffusers)
    expected = {"diffusion_model." + ldm[k]: v for k, v in _merged(unet).items()}
    return tensors, {"model.diffusion_model." + ldm[k]: v.float().contiguous() for k, v in base.items()}, \
        expected, {"family": "sd15"}


def _run(jobs, folder):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    with open(folder / "jobs.json", "w") as f:
        json.dump(jobs, f)
    result = subprocess.run([python, "-c", SCRIPT, str(folder / "jobs.json")], cwd=comfyui, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui),
                                                         "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cases(tiny_flux, sd_models):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    for kind in NETWORKS:
        for family, fmt in (("flux", "kohya"), ("flux", "diffusers"), ("sd15", "kohya")):
            if family == "flux":
                model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
            else:
                model = UNet2DConditionModel.from_pretrained(sd_models["sd15"], subfolder="unet")
            model.requires_grad_(False)
            network = _network(kind, family)
            add_lora(model, network["linear"], network["linear_alpha"],
                     get_family(family).lora_targets(network), network)
            _perturbed(model, seed=len(kind))
            yield f"{kind}-{family}-{fmt}", family, fmt, model, network


def test_comfyui_applies_peft_weights_of_each_type(tiny_flux, sd_models, tmp_path):
    jobs, expected = [], {}
    for name, family, fmt, model, network in _cases(tiny_flux, sd_models):
        make = _flux_job if family == "flux" else _sd_job
        tensors, base, expected[name], extra = make(model, tmp_path, name, network, fmt)
        assert expected[name], name
        save_file(tensors, tmp_path / f"{name}.safetensors")
        save_file(base, tmp_path / f"{name}.base.safetensors")
        jobs.append({"name": name, "lora": str(tmp_path / f"{name}.safetensors"),
                     "base": str(tmp_path / f"{name}.base.safetensors"), **extra})
    reports = _run(jobs, tmp_path)
    for name, report in reports.items():
        assert report["not_loaded"] == [], name
        patched = load_file(tmp_path / f"{name}.safetensors.patched.safetensors")
        assert sorted(patched) == sorted(expected[name]), name
        for key, weight in expected[name].items():
            torch.testing.assert_close(patched[key], weight, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_dora_only_with_lora_and_named(tiny_flux):
    config = {"model": {"family": "flux", "path": tiny_flux}, "dataset": {"folder": "x"},
              "network": {"type": "lokr", "dora": True}}
    with pytest.raises(ConfigError, match="network.dora = true works with network.type lora only"):
        resolve(config)


@pytest.mark.parametrize("kind", ["lora", *NETWORKS])
def test_memory_estimate_counts_what_peft_builds(tiny_flux, kind):
    from diffusers import FluxTransformer2DModel

    from loralab.core.memory.estimate import memory_model

    network = with_defaults({"network": {"linear": 4, **NETWORKS.get(kind, {})}})["network"]
    config = {"model": {"family": "flux", "path": tiny_flux}, "network": network}
    memory = memory_model(config)
    estimated = memory.lora_parameters(memory.shape(config["model"])[0], network)
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").requires_grad_(False)
    add_lora(model, network["linear"], network["linear_alpha"], get_family("flux").lora_targets(network), network)
    assert estimated == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_run_identity_counts_the_adapter_type_where_it_matters():
    from loralab.core.runs.identity import run_identity

    def identity(**network):
        return run_identity(with_defaults({"network": {"linear": 8, **network}}))

    old = with_defaults({"network": {"linear": 8}})  # a config.json written before these keys
    old["network"] = {k: v for k, v in old["network"].items() if k not in ("type", "dora") and "lokr" not in k}
    old = run_identity(old)
    assert identity() == identity(lokr_factor=8) == old  # a run from before network.type resumes
    assert len({json.dumps(identity(**n), sort_keys=True) for n in (
        {}, {"dora": True}, {"type": "loha"}, {"type": "lokr"}, {"type": "lokr", "lokr_factor": 8},
        {"type": "lokr", "lokr_full_rank": True})}) == 6


@pytest.fixture(scope="module")
def learned_types(tiny_flux, tmp_path_factory):
    """A short real training run of each type on tiny FLUX.1: {kind: (final LoRA path, folder)}."""
    from loralab.core.demo.dataset import make_demo_dataset
    from loralab.core.trainer import train

    folder = make_demo_dataset(str(tmp_path_factory.mktemp("types") / "data"), count=3)
    runs = {}
    for kind, fmt in (("lokr", "kohya"), ("loha", "diffusers"), ("dora", "kohya")):
        config = resolve({
            "name": kind, "model": {"path": tiny_flux, "dtype": "fp32"},
            "network": {"linear": 4, **NETWORKS[kind]},
            "dataset": {"folder": folder, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.0},
            "train": {"steps": 60, "lr": 4e-3, "optimizer": "adamw", "dtype": "fp32",
                      "gradient_checkpointing": False},
            "save": {"save_every": 1000, "format": fmt, "output_dir": str(tmp_path_factory.mktemp("out"))},
            "sample": {"sample_every": 0}})
        result = train(config)
        assert result.status == "finished", kind
        runs[kind] = result.lora_path
    return runs, folder


def test_each_type_learns_through_comfyuis_loader(learned_types, tiny_flux, tmp_path):
    """The loss of the training images at fixed noise, with the weights ComfyUI's loader makes of
    each trained file, falls well under the base model's."""
    from diffusers import FluxPipeline

    from loralab.core.families.flux.keys import bfl_to_transformer

    from test_learning import flow_matching_loss, training_batch

    runs, folder = learned_types
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    transformer, config = pipeline.transformer, pipeline.transformer.config
    layers = (config.num_layers, config.num_single_layers)
    base_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    base_file = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model." + k: v.float().contiguous()
               for k, v in transformer_to_bfl(base_state, *layers).items()}, base_file)
    flux_config = {"axes_dim": list(config.axes_dims_rope), "num_heads": config.num_attention_heads,
                   "patch_size": 1, "in_channels": config.in_channels,
                   "out_channels": config.out_channels or config.in_channels}
    reports = _run([{"name": kind, "lora": path, "base": str(base_file), "family": "flux",
                     "flux_config": flux_config} for kind, path in runs.items()], tmp_path)

    latents, text, pooled = training_batch(pipeline, folder)
    base = flow_matching_loss(pipeline, latents, text, pooled)
    shapes = {k: v.shape for k, v in base_state.items()}
    losses = {}
    for kind, path in runs.items():
        assert reports[kind]["not_loaded"] == [] and reports[kind]["patched"] > 0, kind
        patched = load_file(path + ".patched.safetensors")
        bfl = {k[len("diffusion_model."):]: v for k, v in patched.items()}
        transformer.load_state_dict({**base_state, **bfl_to_transformer(bfl, shapes, *layers)})
        losses[kind] = flow_matching_loss(pipeline, latents, text, pooled)
    assert all(loss < 0.8 * base for loss in losses.values()), (base, losses)  # measured: 0.63-0.74


# SD1.5's CPU steps are several times FLUX.1's (40 steps a type at 64 px: 240 s, LoKr at 0.91x
# base): one picture at 32 px, 20 steps at a LyCORIS-like high lr, LoKr at a small factor, full rank
SD_LEARN = {"steps": 20, "lr": 5e-2, "resolution": 32}
SD_NETWORKS = {"lokr": NETWORKS["lokr_full"], "loha": NETWORKS["loha"], "dora": NETWORKS["dora"]}


def test_each_type_learns_on_sd15_and_comfyui_uses_every_key(sd_models, tmp_path):
    """SD1.5 (kohya names): a short real training run of each type; ComfyUI's loader uses every
    key of the file, and with the weights it makes of the file the DDPM loss of the training
    picture at fixed noise and timesteps falls well under the base model's."""
    from diffusers import StableDiffusionPipeline

    from loralab.core.demo.dataset import make_demo_dataset

    from test_sd_training import ddpm_loss, run, training_batch

    folder = sd_models["sd15"]
    data = make_demo_dataset(str(tmp_path / "data"), count=1)
    runs = {kind: run(folder, data, tmp_path / kind, "sd15", network={"linear": 4, **network}, **SD_LEARN)
            for kind, network in SD_NETWORKS.items()}
    assert all(r.status == "finished" for r in runs.values())
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    base_state = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    to_ldm = unet_keys.unet_to_ldm(base_state, pipeline.unet.config)
    base_file = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model." + ldm: base_state[k].float().contiguous() for k, ldm in to_ldm.items()},
              base_file)
    reports = _run([{"name": kind, "lora": r.lora_path, "base": str(base_file), "family": "sd15"}
                    for kind, r in runs.items()], tmp_path)

    batch = training_batch(pipeline, "sd15", data, size=SD_LEARN["resolution"])
    base = ddpm_loss(pipeline, *batch)
    to_unet = {"diffusion_model." + ldm: k for k, ldm in to_ldm.items()}
    ratios = {}
    for kind, result in runs.items():
        modules = {re.sub(r"\.(lora_(down|up)\.weight|alpha|dora_scale|lokr_\w+|hada_\w+)$", "", k)
                   for k in load_file(result.lora_path)}
        assert reports[kind] == {"not_loaded": [], "patched": len(modules)}, kind
        patched = load_file(result.lora_path + ".patched.safetensors")
        pipeline.unet.load_state_dict({**base_state, **{to_unet[k]: v for k, v in patched.items()}})
        ratios[kind] = ddpm_loss(pipeline, *batch) / base
    assert all(ratio < 0.85 for ratio in ratios.values()), ratios  # measured: 0.70-0.75; lr 0: 1.0


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_an_interrupted_run_of_each_type_resumes_to_the_same_weights(resolved, kind):
    """Stopped at step 3 and resumed, the run ends with the weights of one that never stopped."""
    from loralab.core.trainer import train

    def run(name, stop=None):
        config = resolved(name=name, network={"linear": 4, **NETWORKS[kind]},
                          train={"steps": 6, "seed": 7}, save={"save_every": 100, "dtype": "float32"})
        steps = []
        result = train(config, on_event=lambda e: steps.append(e["step"]) if e["type"] == "step" else None,
                       should_stop=(lambda: steps and steps[-1] >= stop) if stop else None)
        return config, result

    _, whole = run("whole")
    config, stopped = run("stopped", stop=3)
    assert stopped.status == "interrupted" and stopped.step == 3
    events = []
    resumed = train(config, on_event=events.append)
    assert resumed.status == "finished" and resumed.step == 6 and {"type": "resume", "step": 3} in events
    expected, got = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert sorted(expected) == sorted(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
