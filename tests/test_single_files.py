"""FLUX.1 from ComfyUI's single files: each part loads streaming and equals the diffusers
folder's; fp8 files and quantize "fp8" work (with a peft LoRA); wrong files are refused."""
import os

import pytest
import torch

from loralab.core.families import describe_file
from loralab.core.families.flux import file_layout, single_files
from loralab.core.families.parts import files
from loralab.core.families.parts.fp8 import Float8Linear
from loralab.core.families.flux.model import ModelError, load_pipeline
from loralab.core.families.flux.tiny import write_comfyui_files

from conftest import COMFYUI_SOURCE as COMFYUI

F32 = torch.float32


@pytest.fixture(scope="module")
def comfy_files(tiny_flux):
    return write_comfyui_files(tiny_flux)


def _inputs(transformer, seed=0):
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    tokens, text_tokens = 16, 5
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3), return_dict=False)


def _run(transformer, inputs):
    dtype = next(p for p in transformer.parameters() if p.dtype != torch.float8_e4m3fn).dtype
    return transformer(**{k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in inputs.items()})[0].float()


@pytest.fixture(scope="module")
def folder_pipeline(tiny_flux):
    return load_pipeline(tiny_flux, dtype="fp32")


def test_transformer_files_match_the_folder(comfy_files, folder_pipeline):
    reference = folder_pipeline.transformer
    inputs = _inputs(reference)
    expected = _run(reference, inputs)
    loaded = single_files.load_part("transformer", comfy_files["transformer"], F32)
    # the file is bf16: the folder's weights rounded to bf16
    assert torch.allclose(_run(loaded, inputs), expected, atol=5e-2, rtol=5e-2)
    assert dict(loaded.config)["axes_dims_rope"] == tuple(reference.config.axes_dims_rope) or \
        list(loaded.config.axes_dims_rope) == list(reference.config.axes_dims_rope)
    fp8_out = _run(single_files.load_part("transformer", comfy_files["transformer_fp8"], F32), inputs)
    error = (fp8_out - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.15, error
    kept = single_files.load_part("transformer", comfy_files["transformer_fp8"], torch.bfloat16, "fp8")
    layer = kept.transformer_blocks[0].attn.to_q
    assert isinstance(layer, Float8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(kept.x_embedder, Float8Linear)
    assert torch.allclose(_run(kept, inputs), fp8_out, atol=0.1 * expected.abs().max().item())


def test_text_encoders_and_vae_match_the_folder(comfy_files, folder_pipeline):
    clip = single_files.load_part("clip_l", comfy_files["clip_l"], F32)
    reference = folder_pipeline.text_encoder
    assert clip.config.vocab_size == 49408  # the real tokenizer's ids fit
    ids = torch.tensor([[reference.config.bos_token_id, 5, 9, 30, reference.config.eos_token_id]])
    got, expected = clip(ids), reference(ids)
    assert torch.allclose(got.last_hidden_state, expected.last_hidden_state, atol=1e-5)
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=1e-5)

    t5 = single_files.load_part("t5", comfy_files["t5"], F32)
    assert t5.config.vocab_size == 32128
    ids = torch.tensor([[4, 8, 15, 16, 1]])
    assert torch.allclose(t5(ids).last_hidden_state,
                          folder_pipeline.text_encoder_2(ids).last_hidden_state, atol=1e-5)

    vae = single_files.load_part("vae", comfy_files["vae"], F32)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(vae.decode(latents).sample, folder_pipeline.vae.decode(latents).sample, atol=1e-5)


def test_pipeline_from_the_four_files(comfy_files, monkeypatch):
    if not os.path.isfile(os.path.join(COMFYUI, "comfy", "sd1_tokenizer", "vocab.json")):
        pytest.skip("no ComfyUI checkout for the tokenizers")
    monkeypatch.setenv("LORALAB_COMFYUI", COMFYUI)
    pipeline = load_pipeline(None, comfy_files["transformer"], dtype="fp32", clip_l_path=comfy_files["clip_l"],
                             t5_path=comfy_files["t5"], vae_path=comfy_files["vae"])
    assert pipeline.scheduler.config.use_dynamic_shifting  # dev
    embeds, pooled, _ = pipeline.encode_prompt("a photo of sks", prompt_2=None, max_sequence_length=32)
    assert embeds.shape[1] == 32 and torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


def test_tokenizers_missing_is_a_clear_error(comfy_files, monkeypatch, tmp_path):
    monkeypatch.delenv("LORALAB_COMFYUI", raising=False)
    with pytest.raises(ModelError, match="LORALAB_COMFYUI"):
        single_files.load_tokenizers(str(tmp_path), [comfy_files["clip_l"]])


def test_fp8_lora_trains_on_the_cpu(tiny_flux):
    from loralab.core.families.flux import LORA_TARGETS
    from loralab.core.lora.inject import add_lora

    pipeline = load_pipeline(tiny_flux, dtype="bf16", quantize="fp8")
    transformer = pipeline.transformer
    assert transformer.single_transformer_blocks[0].proj_mlp.weight.dtype == torch.float8_e4m3fn
    parameters = add_lora(transformer, 4, 4, LORA_TARGETS)
    assert parameters and all(p.dtype == torch.float32 for p in parameters)
    base = transformer.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base, Float8Linear)
    with torch.no_grad():  # a non-zero LoRA B, so that A gets a gradient too
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    out = _run(transformer, _inputs(transformer))
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in parameters)
    assert any(p.grad.abs().sum() > 0 for p in parameters)
    assert base.weight.dtype == torch.float8_e4m3fn and base.weight.grad is None


def test_config_read_from_the_file(comfy_files, tmp_path):
    tensors, metadata = files.read_header(comfy_files["transformer"])
    config = file_layout.transformer_config(tensors, metadata)
    assert (config["num_layers"], config["num_single_layers"], config["guidance_embeds"]) == (2, 2, True)
    assert (config["attention_head_dim"], config["num_attention_heads"]) == (16, 4)
    # schnell: no guidance_in; and one block fewer
    from safetensors.torch import load_file, save_file

    weights = load_file(comfy_files["transformer"])
    schnell = {k: v for k, v in weights.items()
               if not k.startswith(("guidance_in.", "double_blocks.1.", "single_blocks.1."))}
    path = str(tmp_path / "schnell.safetensors")
    save_file(schnell, path, metadata=metadata)
    assert describe_file(path) == "a FLUX.1 transformer (schnell)"
    model = single_files.load_part("transformer", path, F32)
    assert (model.config.num_layers, model.config.num_single_layers, model.config.guidance_embeds) == (1, 1, False)
    assert not single_files.scheduler_for(False).config.use_dynamic_shifting
    assert files.default_axes(128) == (16, 56, 56) and sum(files.default_axes(96)) == 96


@pytest.mark.parametrize("slot, wrong, setting", [
    ("t5", "vae", "model.t5_path"), ("clip_l", "t5", "model.clip_l_path"),
    ("vae", "transformer", "model.vae_path"), ("transformer", "clip_l", "model.transformer_path"),
    ("transformer", "sdxl", "model.transformer_path")])
def test_wrong_file_in_a_slot(comfy_files, tmp_path, slot, wrong, setting):
    if wrong == "sdxl":
        from safetensors.torch import save_file

        path = str(tmp_path / "sd_xl_base.safetensors")
        save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
                   "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, path)
    else:
        path = comfy_files[wrong]
    with pytest.raises(ModelError) as error:
        single_files.load_part(slot, path, F32)
    message = str(error.value)
    assert setting in message and path in message and "looks like" in message
    if wrong == "sdxl":
        assert "SDXL checkpoint" in message


def test_diffusers_keys_behind_comfyuis_prefix(folder_pipeline, tmp_path):
    """ComfyUI's loader strips `model.diffusion_model.` from diffusers keys as from BFL keys
    (unet_prefix_from_state_dict, then convert_diffusers_mmdit); so does ours."""
    from safetensors.torch import save_file

    reference = folder_pipeline.transformer.state_dict()
    path = str(tmp_path / "prefixed-diffusers.safetensors")
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in reference.items()}, path)
    assert describe_file(path) == "a FLUX.1 transformer (dev)"
    loaded = single_files.load_part("transformer", path, F32).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
