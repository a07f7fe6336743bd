"""ComfyUI's own code reads our ComfyUI-layout files: run in ComfyUI's Python (env
LORALAB_COMFYUI_PYTHON; ComfyUI's source at LORALAB_COMFYUI or ../shared/comfyui), skipped
otherwise (a failure with LORALAB_REQUIRE_COMFYUI=1, see comfyui_env.py).

ComfyUI's FLUX loaders assume FLUX's widths (head_dim 128, a 128-channel VAE, T5-XXL and CLIP-L
sizes), so the tiny files are checked with ComfyUI's detection and ComfyUI's own modules built
at the tiny sizes (same key names, no missing or unexpected key), and the real-width files
(transformer, CLIP-L, VAE) go through comfy.sd's loaders themselves."""
import json
import os
import subprocess

from loralab.core.families.flux.tiny import write_comfyui_files, write_real_width_files

from comfyui_env import comfyui_python_or_skip, comfyui_source


def _script(paths):
    return r'''
import json, logging, sys
sys.argv = ["check", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch, comfy.sd, comfy.utils, comfy.ops, comfy.model_detection, comfy.clip_model
import comfy.text_encoders.t5
from comfy.ldm.flux.model import Flux

paths = json.loads(%r)
ops = comfy.ops.disable_weight_init
problems = []
records = []
class Catch(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Catch()); logging.getLogger().setLevel(logging.DEBUG)

def same_keys(label, file_keys, model_keys):
    missing, unexpected = sorted(set(model_keys) - set(file_keys)), sorted(set(file_keys) - set(model_keys))
    if missing or unexpected:
        problems.append(f"{label}: missing {missing[:5]}, unexpected {unexpected[:5]}")

for name in ("transformer", "transformer_fp8"):
    sd, meta = comfy.utils.load_torch_file(paths[name], return_metadata=True)
    if name.endswith("fp8"):
        sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    config = comfy.model_detection.detect_unet_config(sd, "")
    assert config["image_model"] == "flux" and config["guidance_embed"], config
    assert (config["depth"], config["depth_single_blocks"]) == (2, 2), config
    axes = json.loads(meta["loralab.axes_dims_rope"])
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config.update(axes_dim=axes, num_heads=config["hidden_size"] // head_dim, patch_size=1,
                  in_channels=sd["img_in.weight"].shape[1], out_channels=sd["final_layer.linear.weight"].shape[0])
    model = Flux(**config, device="meta", dtype=torch.bfloat16, operations=ops)
    sd = comfy.model_detection.model_config_from_unet(sd, "").process_unet_state_dict(sd)
    keys = [k for k in sd if not k.endswith(("weight_scale", "input_scale", "comfy_quant"))]
    same_keys(name, keys, model.state_dict().keys())

clip = comfy.utils.load_torch_file(paths["clip_l"])
assert comfy.sd.detect_te_model(clip) == comfy.sd.TEModel.CLIP_L
assert "text_model.encoder.layers.1.mlp.fc1.weight" in clip  # FluxClipModel routes it to clip_l
shape = clip["text_model.embeddings.token_embedding.weight"].shape
layers = 1 + max(int(k.split(".")[3]) for k in clip if k.startswith("text_model.encoder.layers."))
cfg = {"num_hidden_layers": layers, "hidden_size": shape[1], "num_attention_heads": 4,
       "intermediate_size": clip["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
       "hidden_act": "quick_gelu", "vocab_size": shape[0], "projection_dim": shape[1],
       "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "eos_token_id": 49407, "bos_token_id": 49406}
same_keys("clip_l", clip.keys(), comfy.clip_model.CLIPTextModel(cfg, torch.float32, "meta", ops).state_dict().keys())

t5 = comfy.utils.load_torch_file(paths["t5"])
assert "text_model.encoder.layers.1.mlp.fc1.weight" not in t5  # FluxClipModel routes it to t5xxl
assert comfy.sd.detect_te_model(t5) in (comfy.sd.TEModel.T5_BASE, comfy.sd.TEModel.T5_XXL)
heads = t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
cfg = {"d_ff": t5["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
       "d_kv": t5["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
       "d_model": t5["shared.weight"].shape[1], "num_heads": heads,
       "num_layers": 1 + max(int(k.split(".")[2]) for k in t5 if k.startswith("encoder.block.")),
       "vocab_size": t5["shared.weight"].shape[0], "dense_act_fn": "gelu_pytorch_tanh",
       "is_gated_act": True, "model_type": "t5", "relative_attention_num_buckets": 32}
same_keys("t5", t5.keys(), comfy.text_encoders.t5.T5(cfg, torch.float32, "meta", ops).state_dict().keys())
if "--real" not in paths:
    print(json.dumps(problems)); raise SystemExit(0)

# the real-width files through comfy.sd's own loaders
records.clear()
model = comfy.sd.load_diffusion_model(paths["real_transformer"])
bad = [r for r in records if "missing" in r.lower() or "left over" in r.lower() or "unexpected" in r.lower()]
if bad: problems.append(f"load_diffusion_model: {bad[:3]}")
del model
records.clear()
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["real_vae"]))
bad = [r for r in records if "missing" in r.lower() or "leftover" in r.lower()]
if bad: problems.append(f"VAE: {bad[:3]}")
vae_keys = set(vae.first_stage_model.state_dict())
tiny_vae = comfy.utils.load_torch_file(paths["vae"])
outside = sorted(set(tiny_vae) - vae_keys)  # the tiny VAE's names are a subset of FLUX's ae
if outside: problems.append(f"tiny VAE names not in ComfyUI's VAE: {outside[:5]}")
records.clear()
clip = comfy.sd.load_clip([paths["real_clip_l"]], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
bad = [r for r in records if "clip missing" in r.lower() or "unexpected" in r.lower()]
if bad: problems.append(f"load_clip: {bad[:3]}")
print(json.dumps(problems))
''' % json.dumps(paths)


def test_comfyui_reads_our_files(tiny_flux, tmp_path):
    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    paths = dict(write_comfyui_files(tiny_flux))
    if os.environ.get("LORALAB_COMFYUI_REAL_WIDTH", "1") == "1":
        real = write_real_width_files(str(tmp_path / "real"))
        paths.update({f"real_{k}": v for k, v in real.items()}, **{"--real": "1"})
    result = subprocess.run([python, "-c", _script(paths)], cwd=comfyui, capture_output=True,
                            text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui)})
    assert result.returncode == 0, result.stderr[-3000:]
    problems = json.loads(result.stdout.strip().splitlines()[-1])
    assert problems == [], problems


SAVE_SCRIPT = r'''
import json, sys
sys.argv = ["save", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch, comfy.utils, comfy.model_detection, comfy.model_patcher, comfy.sd

# each file loaded as UNETLoader does (old scaled fp8 converted, the model found by ComfyUI's
# detection, its state dict processed by the model's process_unet_state_dict), ComfyUI's Flux
# built at the tiny widths its detection does not read (heads, rope axes), then saved by
# comfy.sd.save_checkpoint, the call of the ModelSave node
for source, target in json.loads(sys.argv_files):
    sd, meta = comfy.utils.load_torch_file(source, return_metadata=True)
    sd, meta = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config.unet_config.update(num_heads=config.unet_config["hidden_size"] // head_dim, patch_size=1,
                              axes_dim=json.loads(meta["loralab.axes_dims_rope"]),
                              in_channels=sd["img_in.weight"].shape[1],
                              out_channels=sd["final_layer.linear.weight"].shape[0])
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    cpu = torch.device("cpu")
    comfy.sd.save_checkpoint(target, comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu))
'''


def test_a_transformer_saved_by_comfyui_loads(tiny_flux, tmp_path):
    """ComfyUI keeps FLUX's q/k norms as `..._norm.weight` (BFL's files say `..._norm.scale`) and
    saves behind `model.diffusion_model.`; such a file, bf16 or scaled fp8, loads into the same
    weights as the file ComfyUI read."""
    import torch
    from safetensors import safe_open

    from loralab.core.families.flux import single_files

    python, comfyui = comfyui_python_or_skip(), comfyui_source()
    ours = write_comfyui_files(tiny_flux)
    jobs = [(ours[name], str(tmp_path / f"{name}-saved-by-comfyui.safetensors"))
            for name in ("transformer", "transformer_fp8")]
    script = SAVE_SCRIPT.replace("sys.argv_files", repr(json.dumps(jobs)))
    result = subprocess.run([python, "-c", script], cwd=comfyui, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": os.path.abspath(comfyui)})
    assert result.returncode == 0, result.stderr[-3000:]
    for source, saved in jobs:
        with safe_open(saved, "pt") as f:
            names = set(f.keys())
        assert "model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.weight" in names
        assert not any(k.endswith("_norm.scale") for k in names)
        expected = single_files.load_part("transformer", source, torch.float32).state_dict()
        loaded = single_files.load_part("transformer", saved, torch.float32).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), source
