"""Qwen-Image from ComfyUI's files (model.transformer_path, text_encoder_path, vae_path): each
part loads streaming into the same weights as the diffusers folder's, fp8 kept where asked,
the family is read from the files, a wrong file is refused by its setting; ComfyUI's own code
takes the files (its detection names the transformer qwen_image; its modules at the tiny widths
take every key; its VAE loader decodes our VAE file as diffusers does; at Qwen-Image's real
widths its own load_diffusion_model and VAE loader take our layout whole); `loralab train` runs
from the three files."""
import json
import os
import subprocess

import pytest
import torch
from diffusers import QwenImagePipeline

from loralab.core.families import ModelError, detect_family, get_family, load_model
from loralab.core.families.parts.fp8 import Float8Linear
from loralab.core.families.qwen_image import files
from loralab.core.families.qwen_image.tiny import build_tiny_qwen_image, write_comfyui_files

from conftest import COMFYUI_SOURCE, run_cli
from comfyui_env import comfyui_python_or_skip, comfyui_source

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = get_family("qwen_image")
F32 = torch.float32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not os.path.isdir(os.path.join(COMFYUI_SOURCE, "comfy", "text_encoders", "qwen25_tokenizer")):
        pytest.skip(f"no ComfyUI source at {COMFYUI_SOURCE}: its Qwen2.5 tokenizer is needed")
    return build_tiny_qwen_image(str(tmp_path_factory.mktemp("models") / "tiny-qwen-image"), COMFYUI_SOURCE)


@pytest.fixture(scope="module")
def comfy_files(folder):
    return write_comfyui_files(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return QwenImagePipeline.from_pretrained(folder, local_files_only=True)


def _max_difference(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)


def test_each_part_loads_the_folders_weights(comfy_files, reference):
    assert _max_difference(files.load_transformer(comfy_files["transformer"], None, F32),
                           reference.transformer) < 1e-2  # the file is bf16
    for name in ("transformer_fp8", "transformer_scaled_fp8"):
        error = _max_difference(files.load_transformer(comfy_files[name], None, F32), reference.transformer)
        assert 0 < error < 0.05, (name, error)
    kept = files.load_transformer(comfy_files["transformer_scaled_fp8"], None, torch.bfloat16, "fp8")
    layer = kept.transformer_blocks[0].attn.to_q
    assert isinstance(layer, Float8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert _max_difference(files.load_text_encoder(comfy_files["text_encoder"], F32), reference.text_encoder) == 0
    assert _max_difference(files.load_vae(comfy_files["vae"], F32), reference.vae) == 0


def test_pipeline_from_the_three_files(comfy_files, reference, monkeypatch):
    monkeypatch.setenv("LORALAB_COMFYUI", COMFYUI_SOURCE)
    model = {"family": "auto", "path": None, "dtype": "fp32", "transformer_path": comfy_files["transformer"],
             "text_encoder_path": comfy_files["text_encoder"], "vae_path": comfy_files["vae"]}
    assert detect_family(model) == "qwen_image"
    pipeline = load_model({**model, "family": "qwen_image"}, "none")
    ours = FAMILY.encode_prompts(pipeline, ["a photo of sks"], "cpu")["a photo of sks"]
    embeds, _ = reference.encode_prompt("a photo of sks", device="cpu")
    length = embeds.shape[1]
    assert ours[1].sum() == length and torch.allclose(ours[0][:length], embeds[0], atol=1e-5)
    image, = FAMILY.generate(pipeline, [ours], 0, 2, 4.0, 64, 64, "cpu", ours)
    assert image.size == (64, 64)


@pytest.mark.parametrize("slot, wrong", [("transformer_path", "vae"), ("text_encoder_path", "transformer"),
                                         ("vae_path", "text_encoder")])
def test_a_wrong_file_is_refused_by_its_setting(comfy_files, slot, wrong):
    model = {"path": None, "dtype": "fp32", "transformer_path": comfy_files["transformer"],
             "text_encoder_path": comfy_files["text_encoder"], "vae_path": comfy_files["vae"],
             slot: comfy_files[wrong]}
    with pytest.raises(ModelError) as error:
        FAMILY.load(model)
    message = str(error.value)
    assert f"model.{slot}" in message and comfy_files[wrong] in message and "looks like" in message


def test_loralab_trains_from_the_three_files(comfy_files, tmp_path):
    from loralab.core.demo.dataset import make_demo_dataset

    data = make_demo_dataset(str(tmp_path / "data"), count=2)
    config = {"name": "from-files", "model": {"transformer_path": comfy_files["transformer_scaled_fp8"],
                                               "text_encoder_path": comfy_files["text_encoder"],
                                               "vae_path": comfy_files["vae"], "dtype": "fp32"},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64]},
              "network": {"linear": 4}, "train": {"steps": 4, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(tmp_path / "out")}, "sample": {"sample_every": 0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = run_cli("train", str(tmp_path / "config.json"), timeout=600,
                   env={**os.environ, "LORALAB_COMFYUI": COMFYUI_SOURCE, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(run["run_folder"], "config.json")) as f:
        assert json.load(f)["model"]["family"] == "qwen_image"


COMFYUI_SCRIPT = r'''
import json, logging, sys
paths, tiny = json.load(open(sys.argv[-1]))
sys.argv = ["check", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch, comfy.model_detection, comfy.ops, comfy.sd, comfy.supported_models, comfy.utils
import comfy.text_encoders.llama as llama, comfy.text_encoders.qwen_vl as qwen_vl
from safetensors.torch import load_file

problems = []
records = []
class Catch(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Catch()); logging.getLogger().setLevel(logging.WARNING)
ops = comfy.ops.disable_weight_init

def same(label, ours, theirs):
    ours = {k: tuple(v.shape) for k, v in ours.items()}
    theirs = {k: tuple(v.shape) for k, v in theirs.items()}
    if ours != theirs:
        problems.append(f"{label}: missing {sorted(set(theirs) - set(ours))[:4]}, unexpected "
                        f"{sorted(set(ours) - set(theirs))[:4]}, other shapes "
                        f"{[k for k in ours if k in theirs and ours[k] != theirs[k]][:4]}")

# the transformer files: ComfyUI's detection (after its own conversion of old scaled fp8) names them
for name in ("transformer", "transformer_fp8", "transformer_scaled_fp8"):
    sd, meta = comfy.utils.load_torch_file(paths[name], return_metadata=True)
    sd, meta = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    if type(config).__name__ != "QwenImage":
        problems.append(f"{name}: detected as {type(config).__name__}")
    if name == "transformer":
        config.unet_config.update(tiny["transformer"])
        model = config.get_model({}, "")
        same(name, sd, model.diffusion_model.state_dict())

# the text encoder: ComfyUI's Qwen2.5-VL modules (language model and vision tower) at the tiny widths
sd = load_file(paths["text_encoder"])
text_config = llama.Qwen25_7BVLI_Config(**tiny["text"])
text_config.head_dim, text_config.rope_dims = tiny["head_dim"], tiny["rope_dims"]  # class attributes (7B's 128)
lm = llama.Llama2_(text_config, device="meta", dtype=torch.float32, ops=ops)
vision = qwen_vl.Qwen2VLVisionTransformer(**tiny["vision"], device="meta", dtype=torch.float32, ops=ops)
same("text_encoder", sd, {**{"model." + k: v for k, v in lm.state_dict().items()},
                          **{"visual." + k: v for k, v in vision.state_dict().items()}})

# the VAE: ComfyUI's own loader (it reads the width from the file); decoded latents saved
records.clear()
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))
bad = [r for r in records if "missing" in r.lower() or "leftover" in r.lower() or "unexpected" in r.lower()]
if bad: problems.append(f"VAE: {bad[:3]}")
latents = torch.load(paths["latents"])
images = vae.decode(latents)
torch.save(images.float(), paths["latents"] + ".decoded")

# the real-width files (Qwen-Image's widths, one block) through comfy.sd's own loaders
if "real_transformer" in paths:
    records.clear()
    model = comfy.sd.load_diffusion_model(paths["real_transformer"])
    if type(model.model).__name__ != "QwenImage": problems.append(f"real transformer: {type(model.model).__name__}")
    bad = [r for r in records if "missing" in r.lower() or "unexpected" in r.lower() or "left over" in r.lower()]
    if bad: problems.append(f"load_diffusion_model: {bad[:3]}")
    del model
    records.clear()
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["real_vae"]))
    bad = [r for r in records if "missing" in r.lower() or "leftover" in r.lower()]
    if bad: problems.append(f"real VAE: {bad[:3]}")
print(json.dumps(problems))
'''


def test_comfyui_takes_the_files(folder, comfy_files, reference, tmp_path):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    transformer, text = reference.transformer.config, reference.text_encoder.config
    tiny = {"transformer": {"num_attention_heads": transformer.num_attention_heads,
                            "attention_head_dim": transformer.attention_head_dim,
                            "joint_attention_dim": transformer.joint_attention_dim,
                            "axes_dims_rope": list(transformer.axes_dims_rope)},
            "text": {"vocab_size": text.text_config.vocab_size, "hidden_size": text.text_config.hidden_size,
                     "intermediate_size": text.text_config.intermediate_size,
                     "num_hidden_layers": text.text_config.num_hidden_layers,
                     "num_attention_heads": text.text_config.num_attention_heads,
                     "num_key_value_heads": text.text_config.num_key_value_heads},
            "vision": {"hidden_size": text.vision_config.hidden_size,
                       "output_hidden_size": text.vision_config.out_hidden_size,
                       "intermediate_size": text.vision_config.intermediate_size,
                       "num_heads": text.vision_config.num_heads, "num_layers": text.vision_config.depth},
            "head_dim": text.text_config.hidden_size // text.text_config.num_attention_heads,
            "rope_dims": text.text_config.rope_parameters["mrope_section"]}
    latents = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    paths = {**comfy_files, "latents": str(tmp_path / "latents.pt")}
    if os.environ.get("LORALAB_COMFYUI_REAL_WIDTH", "1") == "1":  # as test_comfyui_files.py
        from loralab.core.families.qwen_image.tiny import write_real_width_files

        real = write_real_width_files(str(tmp_path / "real"), parts=("transformer", "vae"))
        paths.update({f"real_{k}": v for k, v in real.items()})
    torch.save(latents, paths["latents"])
    (tmp_path / "job.json").write_text(json.dumps([paths, tiny]))
    done = subprocess.run([python, "-c", COMFYUI_SCRIPT, str(tmp_path / "job.json")], cwd=comfyui,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    theirs = torch.load(paths["latents"] + ".decoded")  # [B, H, W, C] in 0..1
    with torch.no_grad():
        ours = reference.vae.decode(latents).sample[:, :, 0]
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert theirs.shape[-3:] == ours.shape[-3:]
    torch.testing.assert_close(theirs.reshape(ours.shape), ours, atol=2e-3, rtol=0)
