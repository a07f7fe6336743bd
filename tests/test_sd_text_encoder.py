"""The optional text-encoder LoRA of SDXL and SD1.5 (network.text_encoder), measured outside our
code where it can be: diffusers' own load_lora_weights and encode_prompt read the saved files
(kohya and diffusers formats), ComfyUI's own CLIP key map reads the kohya text-encoder keys.
Tiny models built locally; real training runs."""
import json
import os
import subprocess
import sys
import types

import numpy
import pytest
import torch
from diffusers import StableDiffusionPipeline

from loralab.core.config import ConfigError, resolve
from loralab.core.dataset import Cache
from loralab.core.families import get_family
from loralab.core.lora import add_lora, add_text_encoder_lora, load_lora_weights
from loralab.core.sampling import strength_grid
from loralab.core.trainer import train
from loralab.core.trainer.checkpoints import write_lora

from comfyui_env import comfyui_python_or_skip, comfyui_source
from test_sd_training import PIPELINES

PROMPTS = ["a photo of sks", "sks on a table", ""]
SAMPLE = {"seed": 7, "sample_steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64}


def te_config(folder, dataset, output, steps=6, **train_settings):
    return resolve({
        "name": "te", "model": {"path": folder, "dtype": "fp32"},
        "network": {"linear": 4, "text_encoder": True},
        "dataset": {"folder": dataset, "trigger_word": "sks", "resolution": [64], "caption_dropout_rate": 0.3},
        "train": {"steps": steps, "lr": 3e-3, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, **train_settings},
        "save": {"save_every": 1000, "output_dir": str(output), "dtype": "float32"},
        "sample": {"sample_every": 3, "prompts": ["a photo of sks"], **SAMPLE}})


@pytest.fixture(scope="module")
def trained(sd_models, dataset, tmp_path_factory):
    """{family: (config, result, {"kohya": path, "diffusers": path}, cached captions)}: a run with
    network.text_encoder (sampling on), recording every caption asked of the cache."""
    made = {}
    for family, folder in sd_models.items():
        output = tmp_path_factory.mktemp(f"te-{family}")
        config = te_config(folder, dataset, output)
        asked = []
        with pytest.MonkeyPatch.context() as patch:
            text = Cache.text
            patch.setattr(Cache, "text", lambda self, caption: asked.append(caption) or text(self, caption))
            result = train(config)
        assert result.status == "finished"
        diffusers_path = str(output / "te-diffusers.safetensors")
        write_lora(diffusers_path, result.weights, config, result.step, fmt="diffusers")
        made[family] = (config, result, {"kohya": result.lora_path, "diffusers": diffusers_path}, asked)
    return made


def _text_weights(weights):
    return {k: v for k, v in weights.items() if k.startswith("text_encoder")}


def _our_pipeline(family, folder, weights=None, network=None):
    """A fresh pipeline with our LoRA (UNet and text encoders) at `weights`, or a zero one."""
    pipeline = PIPELINES[family].from_pretrained(folder, local_files_only=True)
    module = get_family(family)
    encoders = module.text_encoders(pipeline)
    network = network or {"linear": 4, "linear_alpha": 4}
    add_text_encoder_lora(encoders, 4, 4, module.text_encoder_lora_targets(network))
    if weights is not None:
        add_lora(pipeline.unet, 4, 4, module.lora_targets(network))
        load_lora_weights(pipeline.unet, weights, encoders)
    return pipeline


@pytest.mark.parametrize("family", PIPELINES)
def test_encode_batch_is_the_cached_encoding_with_gradients(family, sd_models):
    """With the LoRA at its start (zero), encode_batch gives encode_prompts' values, batched, on
    the device, with gradients reaching the text encoders' LoRA."""
    module = get_family(family)
    plain = PIPELINES[family].from_pretrained(sd_models[family], local_files_only=True)
    cached = module.encode_prompts(plain, PROMPTS, "cpu")
    ours = _our_pipeline(family, sd_models[family])
    text, pooled = module.encode_batch(ours, PROMPTS, "cpu")
    assert text.requires_grad and text.shape[0] == pooled.shape[0] == len(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(text[row], cached[prompt][0])
        torch.testing.assert_close(pooled[row], cached[prompt][1])
    (text.square().sum() + pooled.square().sum()).backward()
    for encoder in module.text_encoders(ours).values():  # layer 0 is read by every family
        grads = [p.grad for n, p in encoder.named_parameters() if "layers.0." in n and "lora_B" in n]
        assert len(grads) == 6 and all(g is not None and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("family", PIPELINES)
def test_the_text_encoders_train_and_no_caption_comes_from_the_cache(family, trained):
    config, result, _, asked = trained[family]
    assert asked == []  # captions, dropped ones ("") and sample prompts were all encoded live
    text = _text_weights(result.weights)
    encoders = {"sd15": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[family]
    assert {k.split(".")[0] for k in text} == encoders
    # every CLIP layer's attention and MLP linears: 6 modules a layer, 2 layers, A and B each
    assert len(text) == len(encoders) * 2 * 6 * 2
    # moved from zero, but for the layer SDXL's first encoder does not read (it reads the penultimate)
    unread = "text_encoder.encoder.layers.1." if family == "sdxl" else None
    for key, value in text.items():
        if ".lora_B." in key:
            assert bool(value.any()) != (unread is not None and key.startswith(unread)), key
    assert os.listdir(os.path.join(result.run_folder, "samples"))  # sampled with the live encoding


def test_the_text_encoders_learn_at_their_own_rate(sd_models, dataset, tmp_path):
    """text_encoder_lr 0: the text encoders' LoRA stays at its start (lora_B zero) while the
    UNet's moves."""
    result = train(te_config(sd_models["sdxl"], dataset, tmp_path, steps=3, text_encoder_lr=0.0))
    text = _text_weights(result.weights)
    unet = {k: v for k, v in result.weights.items() if k not in text}
    assert text and all(not v.any() for k, v in text.items() if ".lora_B." in k)
    assert all(v.abs().max() > 0 for k, v in unet.items() if ".lora_B." in k)


def _lora_modules(module):
    return sorted(n for n, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", PIPELINES)
def test_diffusers_loads_every_key_and_encodes_as_we_do(family, fmt, trained, sd_models):
    config, result, paths, _ = trained[family]
    ours = _our_pipeline(family, sd_models[family], result.weights, config["network"])
    theirs = PIPELINES[family].from_pretrained(sd_models[family], local_files_only=True)
    with torch.no_grad():
        base = get_family(family).encode_batch(theirs, PROMPTS, "cpu")
    theirs.load_lora_weights(paths[fmt])
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(ours, name, None) is not None:
            assert _lora_modules(getattr(theirs, name)) == _lora_modules(getattr(ours, name)), name
    with torch.no_grad():
        want = get_family(family).encode_batch(ours, PROMPTS, "cpu")
        assert (want[0] - base[0]).abs().max() > 1e-4  # the trained LoRA changes the text
        if family == "sd15":
            got = (theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0],)
        else:
            embeds, _, pooled, _ = theirs.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
            got = (embeds, pooled)
    for mine, diffusers_own in zip(want, got):
        torch.testing.assert_close(diffusers_own, mine, rtol=1e-5, atol=1e-5)


def test_a_resumed_run_continues_bit_identically(trained, sd_models, dataset, tmp_path):
    """Stopped at step 3 and run again, the text encoders' (and UNet's) LoRA and optimizer state
    come back from the checkpoint: the same weights as the run that never stopped."""
    _, straight, _, _ = trained["sd15"]
    config = te_config(sd_models["sd15"], dataset, tmp_path)
    stops = []
    first = train(config, should_stop=lambda: stops.append(1) or len(stops) >= 3)
    assert first.status == "interrupted" and first.step == 3
    assert _text_weights(first.weights) != {}
    resumed = train(config)
    assert resumed.status == "finished" and resumed.step == 6
    assert sorted(resumed.weights) == sorted(straight.weights)
    different = [k for k in straight.weights if not torch.equal(straight.weights[k], resumed.weights[k])]
    assert different == []


@pytest.mark.parametrize("family", PIPELINES)
def test_sample_grid_puts_the_text_encoder_lora_on_at_the_same_strength(family, trained, sd_models):
    config, result, _, _ = trained[family]
    module = get_family(family)
    pipeline = module.load({**config["model"], "path": sd_models[family]})
    # the text encoders' part made large, so its effect shows in two-step 64-pixel images
    weights = {k: v * (30 if k.startswith("text_encoder") and ".lora_B." in k else 1)
               for k, v in result.weights.items()}
    unet_only = {k: v for k, v in weights.items() if not k.startswith("text_encoder")}

    def grid(lora_weights):
        lora = None if lora_weights is None else {"weights": lora_weights, "network": config["network"]}
        images = strength_grid(module, pipeline, ["a photo of sks"], [0.0, 1.0], SAMPLE, "cpu", lora=lora)[1]
        return {strength: numpy.asarray(cells[0], dtype=numpy.float32) for strength, cells in images.items()}

    base, with_text, without_text = grid(None), grid(weights), grid(unet_only)
    assert (with_text[0.0] == base[0.0]).all()  # strength 0: the text encoders' LoRA is off too
    assert abs(with_text[1.0] - without_text[1.0]).max() > 0  # strength 1: it is on
    assert not any(getattr(pipeline, name, None) is not None and getattr(getattr(pipeline, name), "peft_config", None)
                   for name in ("unet", "text_encoder", "text_encoder_2"))  # left without a LoRA


COMFYUI_SCRIPT = r'''
import json, sys
family, path = sys.argv[-2:]
sys.argv = ["check", "--cpu"]  # ComfyUI reads its own arguments: no CUDA here
import comfy.options
comfy.options.enable_args_parsing()
import comfy.lora, comfy.lora_convert, comfy.sd1_clip, comfy.sdxl_clip
from safetensors.torch import load_file

clip_class = comfy.sd1_clip.SD1ClipModel if family == "sd15" else comfy.sdxl_clip.SDXLClipModel
key_map = comfy.lora.model_lora_keys_clip(clip_class(device="meta"), {})
lora = {k: v for k, v in load_file(path).items() if k.startswith("lora_te")}
patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
print(json.dumps({"modules": len([k for k in lora if k.endswith(".lora_down.weight")]),
                  "patched": sorted(str(k) for k in patches)}))
'''


@pytest.mark.parametrize("family", PIPELINES)
def test_comfyui_maps_every_text_encoder_key_of_the_kohya_file(family, trained, tmp_path):
    python = comfyui_python_or_skip()
    _, result, paths, _ = trained[family]
    done = subprocess.run([python, "-c", COMFYUI_SCRIPT, family, paths["kohya"]], cwd=comfyui_source(),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui_source()), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] == len(_text_weights(result.weights)) // 2 == len(report["patched"])
    wanted = {"sd15": ("clip_l.",), "sdxl": ("clip_l.", "clip_g.")}[family]
    assert {p.split(".")[0] + "." for p in report["patched"]} == set(wanted)


def test_flux_refuses_a_text_encoder_lora():
    with pytest.raises(ConfigError) as error:
        resolve({"model": {"family": "flux", "path": "-"}, "dataset": {"folder": "-"},
                 "network": {"text_encoder": True}})
    assert error.value.problems == ["network.text_encoder = true: FLUX.1 does not offer a "
                                    "text-encoder LoRA; set it to false"]
    with pytest.raises(ValueError, match="network.text_encoder"):
        get_family("flux").text_encoders(None)


def test_apply_lora_patches_comfyuis_clip_too_when_given(trained, monkeypatch):
    """ApplyLoRA hands ComfyUI's load_lora_for_models the CLIP and the strength for it (ComfyUI's
    module stood in for: what it is given is checked; its key map is checked above)."""
    from loralab.nodes import comfy_adapter
    from loralab.nodes.generate import LoRALabApplyLoRA
    from loralab.nodes.values import TrainedLoRA

    config, result, _, _ = trained["sd15"]
    calls = []
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.sd", types.SimpleNamespace(
        load_lora_for_models=lambda model, clip, lora, sm, sc: calls.append((clip, set(lora), sm, sc))
        or (("patched", model), clip and ("patched", clip))))
    comfy_adapter._comfy.cache_clear()
    try:
        lora = TrainedLoRA("te", result.weights, config, result.step, "finished", result.lora_path,
                           result.run_folder, get_family("sd15").lora_to_kohya(
                               StableDiffusionPipeline.from_pretrained(config["model"]["path"]).unet))
        node = LoRALabApplyLoRA()
        assert node.apply("MODEL", lora, 0.7, clip="CLIP") == (("patched", "MODEL"), ("patched", "CLIP"))
        assert node.apply("MODEL", lora, 0.7) == (("patched", "MODEL"), None)
    finally:
        comfy_adapter._comfy.cache_clear()
    (clip, keys, strength, clip_strength), (no_clip, _, _, none_strength) = calls
    assert clip == "CLIP" and strength == clip_strength == 0.7 and (no_clip, none_strength) == (None, 0)
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert list(LoRALabApplyLoRA.RETURN_TYPES) == ["MODEL", "CLIP"]  # MODEL stays output 0
