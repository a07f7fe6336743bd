"""SD1.5 / SDXL files: tiny diffusers folders, single-file checkpoints in the LDM layout ComfyUI
keeps, loading them offline, detecting what a file is, and LoRA weights in kohya's names.
The references are diffusers' own loaders: from_pretrained, from_single_file (its own LDM
converters) and load_lora_weights (its own kohya converter)."""
import json
import os

import pytest
import torch

from loralab.core.families.unet import files, keys, load, tiny

from conftest import COMFYUI_SOURCE

FAMILIES = ("sd15", "sdxl")
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


pytestmark = pytest.mark.usefixtures("one_thread")


# tiny_sd (conftest.py): {family: (folder, single file, v-prediction single file)}


def _pipeline_class(family):
    import diffusers

    return getattr(diffusers, PIPELINES[family])


def _parts(pipeline):
    return {name: getattr(pipeline, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipeline, name, None) is not None}


def _assert_same_weights(expected, got):
    for name, module in _parts(expected).items():
        want, have = module.state_dict(), getattr(got, name).state_dict()
        assert sorted(want) == sorted(have), name
        different = [k for k in want if not torch.equal(want[k].float(), have[k].float())]
        assert different == [], (name, different[:5])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_folder_loads_frozen(tiny_sd, family):
    folder = tiny_sd[family][0]
    reference = _pipeline_class(family).from_pretrained(folder, local_files_only=True)
    assert isinstance(reference.unet.config.down_block_types, (list, tuple))
    assert any(t.startswith("CrossAttn") for t in reference.unet.config.down_block_types)
    assert (reference.unet.config.addition_embed_type == "text_time") == (family == "sdxl")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert size < 40 << 20

    pipeline = load.load_pipeline(family, {"path": folder, "dtype": "fp32", "clip_skip": 2})
    assert type(pipeline).__name__ == PIPELINES[family]
    _assert_same_weights(reference, pipeline)
    for module in _parts(pipeline).values():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert pipeline.loralab_clip_skip == 2
    assert pipeline.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_matches_the_folder(tiny_sd, family):
    """diffusers' own from_single_file reads our checkpoint into exactly the folder's weights, and so
    does our loader, which has only the file and ComfyUI's tokenizer (no config folder)."""
    folder, checkpoint, _ = tiny_sd[family]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    reference = _pipeline_class(family).from_pretrained(folder, local_files_only=True)
    theirs = _pipeline_class(family).from_single_file(checkpoint, config=folder, local_files_only=True)
    _assert_same_weights(reference, theirs)

    ours = load.load_pipeline(family, {"checkpoint_path": checkpoint, "dtype": "fp32"}, comfyui=COMFYUI_SOURCE)
    assert type(ours).__name__ == PIPELINES[family]
    _assert_same_weights(reference, ours)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(reference, name) and getattr(reference, name) is not None:
            want = getattr(reference, name).config
            have = getattr(ours, name).config
            for field in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block",
                          "cross_attention_dim", "num_attention_heads", "projection_dim", "hidden_act",
                          "addition_time_embed_dim", "scaling_factor", "use_linear_projection"):
                if hasattr(want, field) or (isinstance(want, dict) and field in want):
                    w, h = getattr(want, field, None), getattr(have, field, None)
                    assert list(w) == list(h) if isinstance(w, (list, tuple)) else w == h, (name, field, w, h)
    for module in _parts(ours).values():
        assert not any(p.requires_grad for p in module.parameters())
    prompt = "a photo of sks"
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(reference, name, None) is not None:
            assert getattr(ours, name)(prompt).input_ids == getattr(reference, name)(prompt).input_ids
    if family == "sdxl":
        assert ours.tokenizer_2.pad_token == "!"
    assert ours.scheduler.config.prediction_type == "epsilon"

    ours.register_modules(text_encoder=None, **({"text_encoder_2": None} if family == "sdxl" else {}))
    load.reload_text_encoders(ours)
    _assert_same_weights(reference, ours)
    assert ours.text_encoder.dtype == torch.float32 and not ours.text_encoder.training


def test_half_precision_and_text_encoder_reload_from_the_folder(tiny_sd):
    folder = tiny_sd["sdxl"][0]
    pipeline = load.load_pipeline("sdxl", {"path": folder, "dtype": "bf16"})
    assert {p.dtype for m in _parts(pipeline).values() for p in m.parameters()} == {torch.bfloat16}
    pipeline.register_modules(text_encoder=None, text_encoder_2=None)
    load.reload_text_encoders(pipeline)
    assert pipeline.text_encoder_2.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in pipeline.text_encoder_2.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_path_overrides(tiny_sd, family, tmp_path):
    """A VAE file as ComfyUI keeps it in models/vae (LDM keys, like sdxl_vae.safetensors) or with
    diffusers keys replaces the checkpoint's and the folder's VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    folder, checkpoint, _ = tiny_sd[family]
    other = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    state = other.state_dict()
    ldm = {k: state[d].reshape(s).contiguous() for k, (d, s) in
           keys.vae_to_ldm({k: v.shape for k, v in state.items()}, 2).items()}
    save_file(ldm, str(tmp_path / "vae_ldm.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vae_diffusers.safetensors"))
    for vae_file, source in (("vae_ldm.safetensors", {"checkpoint_path": checkpoint}),
                             ("vae_diffusers.safetensors", {"path": folder})):
        pipeline = load.load_pipeline(family, {**source, "dtype": "fp32", "vae_path": str(tmp_path / vae_file)},
                                      comfyui=COMFYUI_SOURCE)
        loaded = pipeline.vae.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state), (vae_file, source)
        assert pipeline.vae.config.scaling_factor == tiny.SCALING[family]
        assert not any(p.requires_grad for p in pipeline.vae.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_detect(tiny_sd, family, tmp_path):
    folder, checkpoint, v_checkpoint = tiny_sd[family]
    assert files.detect(checkpoint) == {"family": family, "prediction_type": "epsilon"}
    assert files.detect(v_checkpoint) == {"family": family, "prediction_type": "v_prediction"}
    assert files.detect(folder) == {"family": family, "prediction_type": "epsilon"}
    pipeline = load.load_pipeline(family, {"checkpoint_path": v_checkpoint, "dtype": "fp32"}, comfyui=COMFYUI_SOURCE)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    pipeline = load.load_pipeline(family, {"checkpoint_path": v_checkpoint, "dtype": "fp32",
                                           "prediction_type": "epsilon"}, comfyui=COMFYUI_SOURCE)
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    other = "sdxl" if family == "sd15" else "sd15"
    with pytest.raises(load.ModelError, match=f"model.family to '{family}'"):
        load.load_pipeline(other, {"checkpoint_path": checkpoint, "dtype": "fp32"}, comfyui=COMFYUI_SOURCE)


def test_detect_modelspec_metadata(tiny_sd, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_sd["sd15"][1])
    path = str(tmp_path / "v.safetensors")
    save_file(weights, path, metadata={"modelspec.prediction_type": "v"})
    assert files.detect(path)["prediction_type"] == "v_prediction"


def test_detect_refuses_other_files(tiny_flux, tmp_path):
    from loralab.core.families.flux.tiny import write_single_file as write_flux
    from safetensors.torch import save_file

    flux = write_flux(tiny_flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match=r"flux\.safetensors looks like a FLUX\.1 transformer"):
        files.detect(flux)
    lora = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(ValueError, match=r"lora\.safetensors looks like a LoRA, not an SD1\.5 or SDXL"):
        files.detect(lora)
    with pytest.raises(ValueError, match="not of StableDiffusionPipeline"):
        files.detect(tiny_flux)
    with pytest.raises(load.ModelError, match="model.checkpoint_path: .*FLUX"):
        load.load_pipeline("sdxl", {"checkpoint_path": flux})


def test_tokenizer_missing_names_what_to_set(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.delenv("LORALAB_COMFYUI", raising=False)
    lone = tmp_path / "elsewhere" / "model.safetensors"
    lone.parent.mkdir()
    os.symlink(tiny_sd["sd15"][1], lone)
    with pytest.raises(load.ModelError, match="LORALAB_COMFYUI"):
        load.load_pipeline("sd15", {"checkpoint_path": str(lone), "dtype": "fp32"})


@pytest.mark.parametrize("family", FAMILIES)
def test_real_architecture_configs(family):
    """The packaged configs build the real architectures (meta device: no memory), and reading
    shapes in our LDM layout gives those configs back, so a real checkpoint loads with them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = files.packaged_config(family, "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(files.packaged_config(family, "vae"))
    params = sum(p.numel() for p in unet.parameters())
    assert abs(params - {"sd15": 859_520_964, "sdxl": 2_567_463_684}[family]) < 1000
    state = unet.state_dict()
    ldm = {ldm: tuple(state[d].shape) for d, ldm in keys.unet_to_ldm(state, unet.config).items()}
    found = files.unet_config(ldm, family, pooled_width=1280 if family == "sdxl" else None)
    for field, value in unet_config.items():
        assert found[field] == value, field
    vae_state = vae.state_dict()
    vae_ldm = {k: s for k, (_, s) in keys.vae_to_ldm({k: v.shape for k, v in vae_state.items()}, 4).items()}
    assert files.vae_config(vae_ldm, family) | {} == {**files.packaged_config(family, "vae"),
                                                     "use_quant_conv": True, "use_post_quant_conv": True}
    with open(os.path.join(files.CONFIGS, family, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == PIPELINES[family]


# ---------------------------------------------------------------------------------------------
# LoRA in kohya's names, read by diffusers' own kohya converter

UNET_TARGETS = r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|resnets\.\d+\.conv[12])$"
TEXT_TARGETS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)$"


def peft_lora(pipeline, family, seed=0):
    """A random LoRA (attention, MLP and resnet convolutions of the UNet, attention of the text
    encoders) put on the pipeline's parts with peft, scale 1 (alpha = rank, as if baked); returns
    its weights in our names (UNet modules bare, text encoders prefixed by their attribute)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    weights = {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                                module)
        prefix = "" if name == "unet" else name + "."
        weights.update({prefix + k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()})
    return weights


def _lora_modules(module):
    return sorted(n for n, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


def _unet_inputs(pipeline, family):
    generator = torch.Generator().manual_seed(1)
    config = pipeline.unet.config
    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=generator), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 77, config.cross_attention_dim, generator=generator))
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_lora_loads_in_diffusers(tiny_sd, family):
    folder = tiny_sd[family][0]
    pipeline_class = _pipeline_class(family)
    ours = pipeline_class.from_pretrained(folder, local_files_only=True)
    weights = peft_lora(ours, family)
    kohya = keys.lora_to_kohya(weights, family, ours.unet.config)
    assert len(kohya) == 3 * sum(k.endswith(".lora_A.weight") for k in weights)
    if family == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
        assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in kohya  # a resnet's conv1
        assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert all(kohya[k].item() == 4.0 for k in kohya if k.endswith(".alpha"))
    assert any(v.dim() == 4 for k, v in kohya.items() if k.endswith("lora_down.weight"))

    theirs = pipeline_class.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        plain = theirs.unet(**_unet_inputs(ours, family)).sample
    theirs.load_lora_weights({k: v.clone() for k, v in kohya.items()})
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(ours, name, None) is not None:
            assert _lora_modules(getattr(theirs, name)) == _lora_modules(getattr(ours, name)), name
    with torch.no_grad():
        inputs = _unet_inputs(ours, family)
        want = ours.unet(**inputs).sample
        assert (want - plain).abs().max() > 1e-3  # the LoRA changes the output
        torch.testing.assert_close(theirs.unet(**inputs).sample, want, rtol=1e-4, atol=1e-5)
        ids = ours.tokenizer("a photo of sks", return_tensors="pt").input_ids
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(ours, name, None) is not None:
                torch.testing.assert_close(getattr(theirs, name)(ids)[0], getattr(ours, name)(ids)[0])
