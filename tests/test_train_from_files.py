"""Training from ComfyUI's single files only (model.path absent): `loralab train` learns (judged by
diffusers' own FluxPipeline from the tiny diffusers folder, the LoRA loaded with load_lora_weights);
the scaled-fp8 file trains like the bf16 one; quantize "fp8" and "auto" on the CPU; a LoRA trained
on an fp8 base has the bf16 base's keys and loads into diffusers with no key left over; a wrong file
in a slot is one `error:` line."""
import glob
import json
import logging
import os

import numpy
import pytest
import torch
from safetensors.torch import load_file

from loralab.core.config import resolve
from loralab.core.families.flux.tiny import write_comfyui_files
from loralab.core.trainer.loop import train

from conftest import COMFYUI_SOURCE as COMFYUI, FAST, merge, run_cli

CLIP_TOKENIZER = os.path.join(COMFYUI, "comfy", "sd1_tokenizer")
T5_TOKENIZER = os.path.join(COMFYUI, "comfy", "text_encoders", "t5_tokenizer")
STEPS = 18  # three epochs of the six demo images

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(CLIP_TOKENIZER, "vocab.json")),
    reason="the tokenizers come from ComfyUI's checkout; set LORALAB_COMFYUI")


@pytest.fixture(scope="module")
def comfy_files(tiny_flux):
    return write_comfyui_files(tiny_flux)


@pytest.fixture(scope="module")
def files_config(comfy_files, demo_dataset, tmp_path_factory):
    """A raw config naming only the four single files (no model.path)."""
    def build(name, train=None, **model):
        return merge(FAST, {
            "name": name,
            "model": {"transformer_path": comfy_files["transformer"], "clip_l_path": comfy_files["clip_l"],
                      "t5_path": comfy_files["t5"], "vae_path": comfy_files["vae"], **model},
            "dataset": {"folder": demo_dataset},
            "train": {"steps": STEPS, **(train or {})},
            "save": {"output_dir": str(tmp_path_factory.getbasetemp() / "files-output"),
                     "save_every": 5, "max_step_saves_to_keep": 10}})
    return build


def _env():
    env = {k: v for k, v in os.environ.items() if k != "LORALAB_COMFYUI"}
    env["LORALAB_COMFYUI"] = COMFYUI
    return env


def _train(raw):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_COMFYUI", COMFYUI)
        return train(resolve(raw))


def _metrics(run_folder):
    with open(os.path.join(run_folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def cli_run(files_config, tmp_path_factory):
    """`loralab train CONFIG` on the bf16 transformer file, quantize left at its default (auto)."""
    raw = files_config("from_files")
    assert "path" not in raw["model"] and "quantize" not in raw["model"]
    config_path = tmp_path_factory.mktemp("configs") / "from_files.json"
    config_path.write_text(json.dumps(raw))
    done = run_cli("train", str(config_path), env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "finished" and report["step"] == STEPS
    return report


@pytest.fixture(scope="module")
def fp8_file_run(files_config, comfy_files):
    """The same run (seed, settings) on the scaled-fp8 transformer file."""
    return _train(files_config("from_fp8_file", transformer_path=comfy_files["transformer_fp8"]))


@pytest.fixture(scope="module")
def quantized_run(files_config):
    """quantize "fp8": block linears kept in float8, computed in bf16; a few steps."""
    return _train(files_config("quantize_fp8", dtype="bf16", quantize="fp8",
                               train={"dtype": "bf16", "steps": 3}))


# ---------------------------------------------------------------------------------------------
# The independent reference: diffusers' FluxPipeline from the tiny folder. Its transformer and VAE
# are the folder's (fp32; the trained-on file is the same weights in bf16); the text side is what
# the single-file run used: ComfyUI's real tokenizers and the text encoders of the files (the
# tiny encoders with embeddings grown to the real vocabularies), read with plain load_state_dict.


def _text_encoder(model_class, folder, path, **config_changes):
    config = model_class.config_class.from_pretrained(folder)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = model_class(config)
    names = set(model.state_dict())
    weights = {}
    for key, value in load_file(path).items():
        if key not in names and key.startswith("text_model.") and key[len("text_model."):] in names:
            key = key[len("text_model."):]
        weights[key] = value
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not [k for k in missing if not k.endswith(("position_ids", "embed_tokens.weight"))], missing
    assert set(unexpected) <= {"text_projection.weight"}, unexpected  # ComfyUI's clip_l carries one
    return model.eval()


@pytest.fixture(scope="module")
def reference(tiny_flux, comfy_files, demo_dataset):
    from diffusers import FluxPipeline
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip_tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, model_max_length=77)
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER, model_max_length=512)
    clip = _text_encoder(CLIPTextModel, os.path.join(tiny_flux, "text_encoder"), comfy_files["clip_l"],
                         vocab_size=49408, bos_token_id=clip_tokenizer.bos_token_id,
                         eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)
    t5 = _text_encoder(T5EncoderModel, os.path.join(tiny_flux, "text_encoder_2"), comfy_files["t5"],
                       vocab_size=32128)
    pipeline = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32, text_encoder=clip,
                                            tokenizer=clip_tokenizer, text_encoder_2=t5,
                                            tokenizer_2=t5_tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for path in sorted(glob.glob(os.path.join(demo_dataset, "image_*"))):
        if path.endswith(".txt"):
            continue
        with open(os.path.splitext(path)[0] + ".txt") as f:
            caption = f.read().strip().replace("[trigger]", "sks")
        images.append((Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC), caption))
    return pipeline, images


@torch.no_grad()
def flow_matching_losses(pipeline, images, draws=2, seed=1234):
    """Mean flow-matching MSE per training image over `draws` fixed (noise, sigma) pairs, written
    with diffusers' own pieces: encode_prompt, the VAE's latent mean with FLUX's shift/scale,
    _pack_latents, _prepare_latent_image_ids."""
    generator = torch.Generator().manual_seed(seed)
    vae_config = pipeline.vae.config
    losses = []
    for image, caption in images:
        prompt_embeds, pooled, text_ids = pipeline.encode_prompt(caption, prompt_2=None, max_sequence_length=512)
        pixels = pipeline.image_processor.preprocess(image, height=64, width=64)
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
        latents = (latents - vae_config.shift_factor) * vae_config.scaling_factor
        batch, channels, height, width = latents.shape
        image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        per_image = []
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=generator)
            sigma = torch.sigmoid(torch.randn(1, generator=generator))
            noisy = (1 - sigma) * latents + sigma * noise
            prediction = pipeline.transformer(
                hidden_states=pipeline._pack_latents(noisy, batch, channels, height, width),
                timestep=sigma, guidance=torch.tensor([1.0]), pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                return_dict=False)[0]
            target = pipeline._pack_latents(noise - latents, batch, channels, height, width)
            per_image.append(torch.nn.functional.mse_loss(prediction, target).item())
        losses.append(float(numpy.mean(per_image)))
    return losses


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_adapter(pipeline, path, name):
    """load_lora_weights with diffusers' log captured: (messages, adapter state dict)."""
    from peft.utils import get_peft_model_state_dict

    records, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        pipeline.load_lora_weights(path, adapter_name=name)
    finally:
        logger.removeHandler(records)
    return records.messages, get_peft_model_state_dict(pipeline.transformer, adapter_name=name)


# ---------------------------------------------------------------------------------------------


def test_train_from_the_four_files_learns(cli_run, reference):
    pipeline, images = reference
    before = flow_matching_losses(pipeline, images)
    pipeline.load_lora_weights(cli_run["lora"], adapter_name="learned")
    try:
        after = flow_matching_losses(pipeline, images)
    finally:
        pipeline.unload_lora_weights()
    print("reference loss before", numpy.round(before, 4), "after", numpy.round(after, 4))
    assert numpy.mean(after) < 0.9 * numpy.mean(before), (before, after)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_scaled_fp8_file_trains_like_the_bf16_file(cli_run, fp8_file_run):
    bf16 = _metrics(cli_run["run_folder"])
    fp8 = _metrics(fp8_file_run.run_folder)
    assert fp8_file_run.status == "finished" and [m["step"] for m in fp8] == [m["step"] for m in bf16]
    # e4m3 keeps 3 mantissa bits: each block weight is off by up to 2^-4 of itself (per-tensor
    # scale, nothing saturates), which moves the tiny transformer's output by a few percent of
    # its size. The loss averages (prediction - target)^2 over every token and channel against a
    # target (noise - latents) far larger than that error, so it moves by much less: measured
    # under 0.1%. 2% bounds it with room, yet is a sixth of what learning lowers the loss by
    # over the run (about 12%), so a run that diverges or does not learn is still caught.
    for a, b in zip(bf16, fp8):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (bf16, fp8)
    assert fp8[-1]["loss"] < fp8[0]["loss"]
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_quantize_fp8_trains_on_the_cpu(quantized_run):
    assert quantized_run.status == "finished" and quantized_run.step == 3
    assert os.path.isfile(quantized_run.lora_path)
    assert all(numpy.isfinite(m["loss"]) for m in _metrics(quantized_run.run_folder))
    weights = load_file(quantized_run.lora_path)
    assert weights and all(torch.isfinite(w.float()).all() for w in weights.values())
    with open(os.path.join(quantized_run.run_folder, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["model"]["quantize"] == "fp8" and recorded["model"]["path"] is None


def test_auto_quantize_is_none_on_the_cpu(cli_run, files_config):
    # Behaviour: the auto run matches an explicit "none" run bit for bit (same seed and draws).
    none = _train(files_config("quantize_none", quantize="none", train={"steps": 5}))
    assert _metrics(none.run_folder)[0]["loss"] == _metrics(cli_run["run_folder"])[0]["loss"]
    auto_step5 = load_file(os.path.join(cli_run["run_folder"], "from_files_000000005.safetensors"))
    none_final = load_file(none.lora_path)
    assert auto_step5.keys() == none_final.keys()
    assert all(torch.equal(auto_step5[k], none_final[k]) for k in auto_step5)


def test_run_records_the_quantize_auto_resolved_to(cli_run):
    # the run folder says what "auto" became, so a run can be read back (and compared) later
    with open(os.path.join(cli_run["run_folder"], "config.json")) as f:
        recorded = json.load(f)
    assert recorded["model"]["quantize"] == "none", recorded["model"]
    assert recorded["train"]["offload_blocks"] == 0, recorded["train"]  # auto offloads nothing on a CPU


def test_fp8_lora_has_the_bf16_lora_keys_and_loads_into_diffusers(cli_run, fp8_file_run, quantized_run,
                                                                  reference):
    bf16 = load_file(cli_run["lora"])
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in bf16.items()}
    for run in (fp8_file_run, quantized_run):
        weights = load_file(run.lora_path)
        assert {k: (tuple(v.shape), v.dtype) for k, v in weights.items()} == shapes, run.lora_path
    pipeline, _ = reference
    weights = load_file(quantized_run.lora_path)
    try:
        messages, adapter = _load_adapter(pipeline, quantized_run.lora_path, "on_fp8")
        assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], messages
        expected = {k[len("transformer."):]: v for k, v in weights.items()}
        assert set(adapter) == set(expected)
        assert all(torch.equal(adapter[k].float(), expected[k].float()) for k in expected)
        # the check above sees a key that matches nothing
        extra = dict(weights)
        extra["transformer.transformer_blocks.0.attn.to_nothing.lora_A.weight"] = \
            weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
        messages, _ = _load_adapter(pipeline, extra, "with_extra")
        assert [m for m in messages if "unexpected keys" in m], messages
    finally:
        pipeline.unload_lora_weights()


def test_wrong_file_in_a_slot_is_one_error_line(files_config, comfy_files, tmp_path):
    raw = files_config("wrong_file", t5_path=comfy_files["vae"])
    config_path = tmp_path / "wrong.json"
    config_path.write_text(json.dumps(raw))
    done = run_cli("train", str(config_path), env=_env())
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "model.t5_path" in errors[0] and comfy_files["vae"] in errors[0], errors[0]
