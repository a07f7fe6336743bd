"""FLUX.2 klein from ComfyUI's files (model.transformer_path, text_encoder_path, vae_path).

The transformer file is written by ComfyUI itself: its own Flux2 model class, built at the tiny
sizes (its detection sizes heads by FLUX.2's head width 128), random weights, saved by
comfy.sd.save_checkpoint (the ModelSave node's call: `model.diffusion_model.` keys, q/k norms as
`.weight`). The reference is diffusers' own converter (convert_flux2_transformer_checkpoint_to_diffusers)
of that file: our streaming loader must give the same weights and the same outputs, and those
outputs are ComfyUI's own Flux2's on the same inputs. Then:
ComfyUI's model_detection names ComfyUI's file, our make-tiny files (bf16, fp8, scaled fp8,
ComfyUI's newer per-layer fp8) and our layout at klein 4B's width as FLUX.2, and its model built
from the detection takes every key; its VAE loader takes our FLUX.2 VAE layout at the real size;
fp8 files load near the bf16 weights; a file of another kind is refused naming the setting;
`loralab train` trains from the three files (family auto) the layers test_flux2.py shows
ComfyUI's LoRA loader takes in full. (A wrong file's ModelError is the CLI's one line as
test_train_from_files.py checks for FLUX.1; here its message is checked in process.)"""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.core.demo.dataset import make_demo_dataset
from loralab.core.families import ModelError, detect_family, get_family

from comfyui_env import COMFYUI_HEAD, comfyui_python_or_skip, comfyui_source
from conftest import run_cli
from test_flux2 import AXES, HEAD_DIM, HEADS, LATENT, LAYERS, SINGLE_LAYERS, \
    TEXT_DIM, build_klein

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = get_family("flux2")
TINY = {"in_channels": LATENT * 4, "out_channels": LATENT * 4, "hidden_size": HEADS * HEAD_DIM, "num_heads": HEADS,
        "axes_dim": list(AXES), "context_in_dim": 3 * TEXT_DIM, "depth": LAYERS, "depth_single_blocks": SINGLE_LAYERS}

SAVE_SCRIPT = COMFYUI_HEAD + r'''
import comfy.model_patcher, comfy.ops
from comfy.ldm.flux.model import Flux

def flux2_config(**sizes):  # what model_detection gives a FLUX.2 file, and the sizes it cannot read
    return {"image_model": "flux2", "mlp_ratio": 3.0, "theta": 2000, "global_modulation": True, "mlp_silu_act": True,
            "qkv_bias": False, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
            "txt_ids_dims": [3], "patch_size": 1, "vec_in_dim": None, "guidance_embed": False, "yak_mlp": False,
            "txt_norm": False, **sizes}

# 1. ComfyUI's Flux2 at the tiny sizes, random, saved as ModelSave saves it
config = comfy.supported_models.Flux2(flux2_config(**job["tiny"]))
config.set_inference_dtype(torch.bfloat16, None)
model = config.get_model({})
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.diffusion_model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
cpu = torch.device("cpu")
comfy.sd.save_checkpoint(job["saved"], comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu))
tiny_keys = set(model.diffusion_model.state_dict())
# ... and its prediction, in float32, for the inputs the test gives (img ids (0, h, w, 0), txt ids (0, 0, 0, l))
inputs = load_file(job["inputs"])
with torch.no_grad():
    out = model.diffusion_model.float()(inputs["latents"], inputs["timestep"], inputs["text"], guidance=None,
                                        transformer_options={})
save_file({"out": out.contiguous()}, job["forward"])

# 2. what ComfyUI's detection (after its conversion of old scaled fp8) makes of each file
report = {"detected": {}, "problems": []}
for name, path in job["files"].items():
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)  # as load_diffusion_model_state_dict
    sd, meta = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    sd, meta = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    found = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    unet = found.unet_config if found else {}
    report["detected"][name] = [type(found).__name__, unet.get("depth"), unet.get("depth_single_blocks")]
    if found is None:
        continue
    sd = found.process_unet_state_dict(sd)
    keys = {k for k in sd if not k.endswith(("weight_scale", "input_scale", "comfy_quant"))}
    if keys != tiny_keys:
        report["problems"].append(f"{name}: missing {sorted(tiny_keys - keys)[:4]}, unexpected {sorted(keys - tiny_keys)[:4]}")

# 3. our layout at klein 4B's width (shapes only): the model ComfyUI builds from its detection takes it
shapes = {k: torch.empty(s, device="meta") for k, s in job["real_shapes"].items()}
unet = comfy.model_detection.detect_unet_config(shapes, "")
real = Flux(**unet, device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
theirs = {k: tuple(v.shape) for k, v in real.state_dict().items()}
ours = {k: tuple(v.shape) for k, v in comfy.supported_models.Flux2(unet).process_unet_state_dict(shapes).items()}
if ours != theirs:
    report["problems"].append(f"real width: {sorted(set(ours) ^ set(theirs))[:4]}")
report["real_width"] = [unet["image_model"], unet["hidden_size"], unet["num_heads"], unet["context_in_dim"]]

# 4. our FLUX.2 VAE layout at the real size, by ComfyUI's VAE loader
if job.get("real_vae"):
    warnings.clear()
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(job["real_vae"]))
    bad = [w for w in warnings if "missing" in w.lower() or "leftover" in w.lower()]
    report["vae"] = [vae.latent_channels, bad]
print(json.dumps(report))
'''


def _comfyui(script, job, tmp):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    (tmp / "job.json").write_text(json.dumps(job))
    done = subprocess.run([python, "-c", script, str(tmp / "job.json")], cwd=comfyui, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def real_width_shapes():
    """Our layout of a transformer of klein 4B's widths (diffusers' klein-4b config), one block
    of each kind, shapes only."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from loralab.core.families.flux2.files import to_comfyui_layout

    with init_empty_weights():
        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=False)
    return {k: list(v.shape) for k, v in to_comfyui_layout(model.state_dict()).items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path}: the diffusers folder (diffusers' own classes), ComfyUI's transformer file
    saved by ComfyUI, the folder's text encoder as ComfyUI's qwen_3_4b (Hugging Face's names behind
    `model.`, no lm_head), our make-tiny ComfyUI files; and ComfyUI's report on them."""
    from transformers import Qwen3ForCausalLM

    from loralab.core.families.flux2.tiny import write_comfyui_files

    root = tmp_path_factory.mktemp("flux2files")
    folder = build_klein(str(root / "model"))
    ours = write_comfyui_files(folder)
    models = root / "models"
    for sub in ("diffusion_models", "text_encoders"):
        (models / sub).mkdir(parents=True)
    paths = {"folder": folder, "saved": str(models / "diffusion_models" / "flux-2-klein-base-tiny-saved.safetensors"),
             "text_encoder": str(models / "text_encoders" / "qwen_3_4b.safetensors"), "vae": ours["vae"], "ours": ours}
    encoder = Qwen3ForCausalLM.from_pretrained(os.path.join(folder, "text_encoder"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in encoder.state_dict().items() if k.startswith("model.")},
              paths["text_encoder"])
    generator = torch.Generator().manual_seed(5)
    save_file({"latents": torch.randn(1, LATENT * 4, 4, 4, generator=generator),
               "text": torch.randn(1, 6, 3 * TEXT_DIM, generator=generator), "timestep": torch.tensor([0.6])},
              str(root / "inputs.safetensors"))
    paths["forward"] = str(root / "comfyui-forward.safetensors")
    job = {"tiny": TINY, "saved": paths["saved"], "real_shapes": real_width_shapes(),
           "inputs": str(root / "inputs.safetensors"), "forward": paths["forward"],
           "files": {**{k: v for k, v in ours.items() if k.startswith("transformer")}, "saved": paths["saved"]}}
    if os.environ.get("LORALAB_COMFYUI_REAL_WIDTH", "1") == "1":  # as test_comfyui_files.py
        from loralab.core.families.flux2.tiny import write_real_width_files

        job["real_vae"] = write_real_width_files(str(root / "real"), parts=("vae",))["flux2_vae"]
    paths["report"] = _comfyui(SAVE_SCRIPT, job, root)  # it saves its file first, then reads them all
    return paths


def _reference(path):
    """diffusers' Flux2Transformer2DModel of a BFL-layout file, by diffusers' own converter."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    weights = {k.removeprefix("model.diffusion_model."): v.float() for k, v in load_file(path).items()}
    model = Flux2Transformer2DModel(in_channels=LATENT * 4, num_layers=LAYERS, num_single_layers=SINGLE_LAYERS,
                                    attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                    joint_attention_dim=3 * TEXT_DIM, axes_dims_rope=AXES, guidance_embeds=False)
    model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(weights), strict=True)
    return model.eval()


def _outputs(model):
    """The transformer's prediction [1, 16 tokens, C] for fixed inputs, ids as Flux2KleinPipeline's."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, LATENT * 4, 4, 4, generator=generator).flatten(2).transpose(1, 2)  # row order
    text = torch.randn(1, 6, 3 * TEXT_DIM, generator=generator)
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1),
                                           indexing="ij"), -1).reshape(1, 16, 4)
    text_ids = torch.stack([torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.arange(6.0)], -1)[None]
    with torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([0.6]), img_ids=image_ids,
                     txt_ids=text_ids, guidance=None, return_dict=False)[0]


def test_comfyuis_saved_transformer_loads_as_diffusers_converts_it(files):
    from loralab.core.families.flux2.files import load_transformer

    saved = load_file(files["saved"])
    assert "model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.weight" in saved  # ComfyUI's naming
    ours, reference = load_transformer(files["saved"], torch.float32), _reference(files["saved"])
    want, got = reference.state_dict(), ours.state_dict()
    assert set(want) == set(got) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_outputs(ours), _outputs(reference))
    comfy = load_file(files["forward"])["out"].flatten(2).transpose(1, 2)  # ComfyUI's own Flux2, same weights
    assert torch.allclose(_outputs(ours), comfy, atol=1e-4, rtol=1e-3), (_outputs(ours) - comfy).abs().max()
    assert (ours.config.num_layers, ours.config.num_single_layers, ours.config.timestep_guidance_channels) == \
        (LAYERS, SINGLE_LAYERS, 256)


def test_make_tiny_comfyui_files_are_the_folders_model(files):
    """Our bf16 file is BFL's layout (diffusers' converter maps it back to the folder's weights);
    the fp8 ones load near them."""
    from diffusers import Flux2Transformer2DModel

    from loralab.core.families.flux2.files import load_transformer

    folder = Flux2Transformer2DModel.from_pretrained(files["folder"], subfolder="transformer").eval()
    reference = _reference(files["ours"]["transformer"])
    for key, value in folder.state_dict().items():  # the file is bf16
        assert torch.allclose(reference.state_dict()[key], value, atol=1e-2, rtol=1e-2), key
    expected = _outputs(reference)
    for name, tolerance in (("transformer", 0), ("transformer_fp8", 0.2), ("transformer_scaled_fp8", 0.1),
                            ("transformer_comfy_quant", 0.1)):
        got = _outputs(load_transformer(files["ours"][name], torch.float32))
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error <= tolerance and (error > 0 or name == "transformer"), (name, error)


def test_comfyui_detects_every_file_as_flux2(files):
    report = files["report"]
    assert report["problems"] == []
    assert report["detected"] == {name: ["Flux2", LAYERS, SINGLE_LAYERS] for name in report["detected"]}
    assert set(report["detected"]) == {"transformer", "transformer_fp8", "transformer_scaled_fp8",
                                       "transformer_comfy_quant", "saved"}
    assert report["real_width"] == ["flux2", 3072, 24, 7680]
    if "vae" in report:
        assert report["vae"] == [128, []]  # 32 latent channels, patchified 2x2


def _model(files, **given):
    return {"path": None, "family": "flux2", "dtype": "fp32", "transformer_path": files["saved"],
            "text_encoder_path": files["text_encoder"], "vae_path": files["vae"], **given}


def test_the_family_is_read_from_the_files(files):
    assert detect_family({**_model(files), "family": "auto"}) == "flux2"
    assert detect_family({"path": None, "transformer_path": files["ours"]["transformer_fp8"]}) == "flux2"
    assert not get_family("flux").claims_files({"transformer_path": files["saved"]})
    assert not get_family("zimage").claims_files(_model(files))


def _flux1_transformer(path):
    from diffusers import FluxTransformer2DModel

    from loralab.core.families.flux.keys import transformer_to_bfl

    model = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6))
    save_file({k: v.contiguous() for k, v in transformer_to_bfl(model.state_dict(), 1, 1).items()}, path)
    return path


def test_a_file_of_another_kind_is_refused_naming_the_setting(files, tmp_path):
    sdxl = str(tmp_path / "sd_xl_base_1.0.safetensors")  # SDXL's checkpoint keys, as comfy/sd.py tells it
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, sdxl)
    for slot, wrong, looks in (("transformer_path", _flux1_transformer(str(tmp_path / "flux1-dev.safetensors")),
                                "a FLUX.1 transformer"),
                               ("transformer_path", sdxl, "an SDXL checkpoint"),
                               ("text_encoder_path", files["vae"], "the FLUX.2 VAE"),
                               ("vae_path", files["saved"], "a FLUX.2 transformer")):
        with pytest.raises(ModelError) as error:
            FAMILY.load(_model(files, **{slot: wrong}), "none", comfyui_source())
        message = str(error.value)
        assert message.startswith(f"model.{slot}: {wrong} looks like {looks}") and "\n" not in message, message
    from transformers import Qwen3Config, Qwen3Model

    other = str(tmp_path / "qwen3-other-width.safetensors")  # a Qwen3 the transformer cannot read
    encoder = Qwen3Model(Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    save_file({"model." + k: v.contiguous() for k, v in encoder.state_dict().items()}, other)
    with pytest.raises(ModelError, match=r"model\.text_encoder_path: the text encoder is 32 wide"):
        FAMILY.load(_model(files, text_encoder_path=other), "none", comfyui_source())


def test_loralab_trains_from_comfyuis_files(files, tmp_path):
    from loralab.core.families.flux2.files import load_tokenizer

    data = make_demo_dataset(str(tmp_path / "data"), count=2)
    config = {"name": "files", "model": {k: v for k, v in _model(files).items() if k not in ("path", "family")},
              "dataset": {"folder": data, "trigger_word": "sks", "resolution": [64]}, "network": {"linear": 4},
              "train": {"steps": 2, "optimizer": "adamw", "dtype": "fp32"},
              "save": {"output_dir": str(tmp_path / "out"), "save_every": 1000}, "sample": {"sample_every": 0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = run_cli("train", str(tmp_path / "config.json"), timeout=600,
                   env={**os.environ, "LORALAB_COMFYUI": comfyui_source(), "OMP_NUM_THREADS": "1"})  # the tokenizer
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(run["run_folder"], "config.json")) as f:
        assert json.load(f)["model"]["family"] == "flux2"
    # the same layers as a run from the diffusers folder, which test_flux2.py's ComfyUI check
    # shows ComfyUI's LoRA loader uses in full
    modules = {k.split(".lora_")[0] for k in load_file(run["lora"])}
    assert modules == {f"transformer.transformer_blocks.{i}.{m}" for i in range(LAYERS) for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")} | {f"transformer.single_transformer_blocks.{i}.attn.{m}"
                                     for i in range(SINGLE_LAYERS) for m in ("to_qkv_mlp_proj", "to_out")}
    # the prompt is klein's (Qwen3's template without thinking), not Qwen2.5's system message
    tokenizer = load_tokenizer(comfyui_source())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "sks"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nsks<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_the_pipeline_from_files_samples_and_the_coach_reads_the_name(files):
    pipeline = FAMILY.load(_model(files), "none", comfyui_source())
    assert not pipeline.config.is_distilled  # named "-base"
    embeds = FAMILY.encode_prompts(pipeline, ["a photo of sks", ""], "cpu")
    image, = FAMILY.generate(pipeline, [embeds["a photo of sks"]], 0, 2, 4.0, 64, 64, "cpu", embeds[""])
    assert image.size == (64, 64)
    assert FAMILY.advice({"transformer_path": files["saved"]}) == []
    (message,) = FAMILY.advice({"transformer_path": "/m/flux-2-klein-4b-fp8.safetensors"})
    assert "step-distilled" in message and "flux-2-klein-base-4b" in message


def test_the_base_model_node_takes_comfyuis_three_files(files, monkeypatch):
    from loralab.nodes.inputs import LoRALabLoadBaseModel

    models = os.path.dirname(os.path.dirname(files["saved"]))
    os.makedirs(os.path.join(models, "vae"), exist_ok=True)
    vae = os.path.join(models, "vae", "flux2-vae.safetensors")
    if not os.path.exists(vae):
        os.link(files["vae"], vae)
    monkeypatch.setenv("LORALAB_MODELS", models)
    names = {"diffusion_model": os.path.basename(files["saved"]),
             "text_encoder": os.path.basename(files["text_encoder"]), "vae": "flux2-vae.safetensors"}
    (model,) = LoRALabLoadBaseModel().load("auto", "", "fp32", "auto", **names)
    assert model.section["family"] == "flux2" and model.section["vae_path"] == vae
