"""The LoRA file: loads in diffusers with every key matched, in both formats, at the trained
scale (alpha baked into lora_B), with the config and step in its metadata."""
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from loralab.core.families.flux import FAMILY as flux
from loralab.core.families.flux import keys
from loralab.core.families.parts import flow
from loralab.core.lora import add_lora, load_lora_weights, read_lora_file
from loralab.core.trainer import train, write_lora


@pytest.fixture(scope="module")
def trained(tiny_flux, demo_dataset, tmp_path_factory):
    from loralab.core.config import resolve

    config = resolve({"name": "file_test", "model": {"path": tiny_flux, "dtype": "fp32"},
                      "dataset": {"folder": demo_dataset, "trigger_word": "sks", "resolution": [64]},
                      "network": {"linear": 4, "linear_alpha": 8},  # scale 2: baking must show
                      "train": {"steps": 10, "lr": 5e-3, "optimizer": "adamw", "dtype": "fp32",
                                "gradient_checkpointing": False},
                      "save": {"output_dir": str(tmp_path_factory.mktemp("out")), "save_every": 100},
                      "sample": {"sample_every": 0}})
    return train(config)


def transformer_output(transformer):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text, pooled = torch.randn(1, 7, 64, generator=generator), torch.randn(1, 64, generator=generator)
    with torch.no_grad():
        return flux.predict(transformer, flow.pack(latents), torch.tensor([0.6]), text, pooled, 16, 16, 1.0)


def reference_output(tiny_flux, weights):
    """Our own peft model with the trained float32 weights at rank 4, alpha 8."""
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    add_lora(transformer, 4, 8, flux.LORA_TARGETS)
    load_lora_weights(transformer, weights)
    return transformer_output(transformer)


def test_file_keys_dtype_and_metadata(trained):
    tensors, metadata = read_lora_file(trained.lora_path)
    assert all(k.startswith("transformer.") for k in tensors)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in tensors
    assert not [k for k in tensors if "alpha" in k]
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert json.loads(metadata["loralab_config"])["network"]["linear_alpha"] == 8
    assert metadata["loralab_step"] == "10" and metadata["ss_network_dim"] == "4"
    baked = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].float()
    raw = trained.weights["transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert torch.allclose(baked, raw * 2, atol=1e-3)


def test_diffusers_loads_every_key_at_the_trained_scale(trained, tiny_flux, tmp_path):
    path = write_lora(str(tmp_path / "fp32.safetensors"), trained.weights, trained.config, 10, dtype="float32")
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    before = transformer_output(pipeline.transformer)
    pipeline.load_lora_weights(path, adapter_name="mine")
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name="mine")
    tensors, _ = read_lora_file(path)
    assert {"transformer." + k for k in loaded} == set(tensors)  # no key left unmatched
    after = transformer_output(pipeline.transformer)
    assert not torch.allclose(before, after, atol=1e-4)  # the LoRA changes the output ...
    assert torch.allclose(after, reference_output(tiny_flux, trained.weights), atol=1e-4)  # ... as trained


def test_kohya_format_is_the_same_lora(trained, tiny_flux, tmp_path):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    to_kohya = flux.lora_to_kohya(transformer)
    path = write_lora(str(tmp_path / "kohya.safetensors"), trained.weights, trained.config, 10,
                      to_kohya=to_kohya, fmt="kohya", dtype="float32")
    with safe_open(path, "pt") as f:
        names = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names
    assert "lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight" in names
    assert "lora_unet_single_blocks_0_linear1.alpha" in names
    assert "lora_unet_single_blocks_1_linear2.lora_down.weight" in names
    assert not [k for k in names if not k.startswith("lora_unet_")]
    assert not [k for k in names if "_mod_lin" in k or "modulation" in k]  # not trained
    # Each kohya module is a BFL (ComfyUI) weight: its delta up @ down * alpha / rank must equal
    # the trained deltas of the diffusers modules it fuses, stacked in BFL's order (q, k, v, mlp).
    # (diffusers' own kohya reader assumes FLUX.1's 3072 width, so it cannot read a tiny model.)
    tensors, _ = read_lora_file(path)
    for bfl_name, parts in keys.block_modules(2, 2):
        name = "lora_unet_" + bfl_name.replace(".", "_")
        if f"{parts[0]}.lora_A.weight" not in trained.weights:  # modulation linears: not targeted
            continue
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        delta = up @ down * tensors[f"{name}.alpha"].item() / down.shape[0]
        expected = torch.cat([trained.weights[f"{p}.lora_B.weight"] @ trained.weights[f"{p}.lora_A.weight"] * 2
                              for p in parts])
        assert torch.allclose(delta, expected, atol=1e-5), name


def test_loaded_pipeline_images_change(trained, tiny_flux):
    pipeline = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)

    def image():
        return pipeline("a photo of sks", width=64, height=64, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(1), output_type="np").images[0]

    base = image()
    pipeline.load_lora_weights(trained.lora_path)
    assert abs(image() - base).mean() > 1e-3
