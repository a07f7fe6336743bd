"""train.offload_blocks on the CPU: the same losses and a bit-identical LoRA file as a run without
it (full precision and fp8 storage, gradient checkpointing on and off), and the device copies it
makes, watched as they are made and as they are freed, never hold more than two offloaded blocks
at once (the one computing and the one prefetched)."""
import contextlib
import weakref

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open

from loralab.core.config import resolve
from loralab.core.families import get_family
from loralab.core.memory import offload as offload_module
from loralab.core.trainer import train

STEPS = 2


def run(make_config, name, offload_blocks, quantize="none", checkpointing=False, sample=False, model=None):
    """(losses, LoRA file tensors, the pipeline given to train()) of a short run on the tiny FLUX.1
    (or the `model` section's)."""
    config = resolve(make_config(
        name=name, model={"quantize": quantize, **(model or {})},
        train={"steps": STEPS, "offload_blocks": offload_blocks, "gradient_checkpointing": checkpointing},
        sample={"sample_every": 1 if sample else 0, "sample_steps": 1, "prompts": ["a sks star"]},
        logging={"performance_log_every": 1}))
    pipeline = get_family(config["model"]["family"]).load(config["model"], quantize)
    # On a GPU the weights are fresh device allocations; on the CPU most are slices of the
    # safetensors file's mapping, 24 bytes off a 64-byte line, and a matmul's last bits depend on
    # that. Fresh copies, as a device move makes, so both runs compute from aligned weights.
    trained = get_family(config["model"]["family"]).trainable_model(pipeline)
    for tensor in [*trained.parameters(), *trained.buffers()]:
        tensor.data = tensor.data.clone()
    losses = []
    result = train(config, pipeline, on_event=lambda e: losses.append(e["loss"]) if e["type"] == "step" else None)
    assert result.status == "finished", result
    with safe_open(result.lora_path, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return losses, tensors, pipeline


class Resident:
    """Counts the device copies alive at once, by bytes and by the block they belong to: each copy
    is seen when it is made (the `watch` hook) and when it is freed (a weakref finalizer), so
    a copy that autograd or a cache still holds counts as resident."""

    def __init__(self, monkeypatch):
        self.alive, self.blocks, self.peak_bytes, self.peak_blocks, self.offloads = {}, {}, 0, 0, []
        made = offload_module.BlockOffload.__init__

        def init(offload, *args, **kwargs):
            made(offload, *args, **kwargs)
            offload.watch = self.watch
            self.offloads.append(offload)
        monkeypatch.setattr(offload_module.BlockOffload, "__init__", init)
        copy = offload_module.BlockOffload.copy

        def copying(offload, index):
            self.current = index
            copy(offload, index)
        monkeypatch.setattr(offload_module.BlockOffload, "copy", copying)

    def watch(self, value):
        if not isinstance(value, torch.Tensor):   # bitsandbytes' int8 state: its CB is the weight's
            return
        key, index = object(), self.current
        self.alive[key] = (index, value.numel() * value.element_size())
        self.blocks[index] = self.blocks.get(index, 0) + 1
        weakref.finalize(value, self.freed, key)
        self.peak_bytes = max(self.peak_bytes, sum(size for _, size in self.alive.values()))
        self.peak_blocks = max(self.peak_blocks, len({i for i, _ in self.alive.values()}))

    def freed(self, key):
        self.alive.pop(key)


def frozen_bytes(block):
    return sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()] if not t.requires_grad)


def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("family, quantize, checkpointing", [
    ("flux", "none", False), ("flux", "none", True), ("flux", "fp8", False), ("sd15", "none", True)])
def test_offloaded_run_trains_the_same_lora(make_config, sd_models, monkeypatch, family, quantize, checkpointing):
    model = {"family": "sd15", "path": sd_models["sd15"]} if family == "sd15" else None
    losses, lora, plain = run(make_config, "plain", 0, quantize, checkpointing, model=model)
    every_block = len(get_family(family).offload_blocks(get_family(family).trainable_model(plain)))
    resident = Resident(monkeypatch)
    sample = quantize == "none" and not checkpointing  # sampling mid-run goes through the blocks too
    offloaded = run(make_config, "offloaded", every_block, quantize, checkpointing, sample, model)
    assert offloaded[0] == losses
    assert offloaded[1].keys() == lora.keys()
    for key in lora:
        assert torch.equal(offloaded[1][key], lora[key]), key
    # every block offloaded: at most two (the one computing, the one prefetched) on the device
    offload, = resident.offloads
    family = get_family(family)
    blocks = family.offload_blocks(family.trainable_model(offloaded[2]))
    assert offload.blocks == blocks and resident.blocks.keys() == set(range(len(blocks)))
    assert resident.peak_blocks == 2, resident.peak_blocks  # with prefetch, exactly two
    largest = sorted(frozen_bytes(b) for b in blocks)[-2:]
    assert resident.peak_bytes <= sum(largest) and not resident.alive


def test_the_model_is_given_back_whole(make_config):
    """The pipeline handed to train() (ComfyUI's) comes back with every weight in its module, as
    it was: no hooks, no placeholders."""
    config = resolve(make_config(name="given", train={"steps": 1, "offload_blocks": 2}))
    pipeline = get_family("flux").load(config["model"])
    before = state(pipeline.transformer)
    train(config, pipeline)
    after = pipeline.transformer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in vars(m) or m._forward_pre_hooks for m in pipeline.transformer.modules())


def bnb_blocks(kind, seed=0):
    """Three blocks of one bitsandbytes Linear each (nf4 or int8, quantized on the CPU), with a
    peft LoRA, as core/families/parts/bnb.py makes them."""
    bnb = pytest.importorskip("bitsandbytes")

    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList()
    for _ in range(3):
        weight = torch.randn(32, 32) * 0.1
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(32, 32, False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(32, 32, False, has_fp16_weights=False, device="meta")
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        blocks.append(torch.nn.Sequential(layer.to("cpu")))
    model = torch.nn.Module()
    model.blocks = blocks
    model.forward = lambda x: blocks[2](blocks[1](blocks[0](x)))
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_layers_offload_with_their_quantization_state(kind, monkeypatch):
    """nf4's quant_state and int8's CB/SCB travel with the weight (bitsandbytes on the CPU; the
    CUDA path is the same code with pinned memory and a side stream, not run here)."""
    results = []
    for count in (0, 3):
        model = bnb_blocks(kind)
        resident = Resident(monkeypatch) if count else None
        offload = offload_module.offload_blocks(model, list(model.blocks), count, "cpu", checkpointed=False)
        with offload.weights_on_host() if offload else contextlib.nullcontext():
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=r"blocks\.\d\.0"), model)
        parameters = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(1)
        for parameter in parameters:  # lora_B starts at zero: give it a gradient path both ways
            torch.nn.init.normal_(parameter, std=0.1)
        grads = []
        for _ in range(2):  # int8 moves CB into its state on the first forward
            x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
            model(x).square().sum().backward()
            grads.append([x.grad, *[p.grad.clone() for p in parameters]])
            for p in parameters:
                p.grad = None
        if offload:
            assert resident.peak_blocks == 2 and not resident.alive
            offload_module.restore(model)
        results.append(grads)
    for plain, offloaded in zip(*results):
        for a, b in zip(plain, offloaded):
            assert torch.equal(a, b)


def test_more_blocks_than_the_model_has_is_refused_by_name():
    """An explicit count the model cannot take stops the run in one line naming the setting."""
    model = bnb_blocks("nf4")
    with pytest.raises(offload_module.OffloadTooMany, match=r"train\.offload_blocks 4: .* 3 blocks"):
        offload_module.offload_blocks(model, list(model.blocks), 4, "cpu", checkpointed=False)
