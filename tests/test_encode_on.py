"""model.encode_on: where the captions are encoded before training, and that the text encoders are
never on the device while the trained model is (except a text-encoder LoRA's, which train there).

This machine has no GPU. The decision is a pure function of the setting, the run's device and the
sizes (tested with device descriptors: nothing is moved to them). The trainer test replaces the
decision (the only stand-in) by one that answers `cpu:0`, a real device distinct from the run's
`cpu`, so that what the trainer does with the answer can be seen."""
import pytest
import torch

from loralab.core.families import get_family
from loralab.core.memory import encode_device, text_encoder_bytes
from loralab.core.trainer import setup, train

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # descriptors only
GIB = 2 ** 30


@pytest.mark.parametrize("setting, device, encoder, card, expected", [
    ("cpu", CUDA, 1 * GIB, 24 * GIB, CPU),      # never on the GPU, whatever fits
    ("device", CUDA, 30 * GIB, 24 * GIB, CUDA),  # asked for: the GPU, even if it may not fit
    ("auto", CUDA, 9.5 * GIB, 12 * GIB, CUDA),   # T5-XXL in bf16 fits a 12 GB card alone
    ("auto", CUDA, 9.5 * GIB, 8 * GIB, CPU),     # ... not an 8 GB one
    ("auto", CUDA, 16 * GIB, 16 * GIB, CPU),     # the card's whole memory is not free to use
    ("auto", CUDA, 1 * GIB, None, CUDA),         # an accelerator of unknown size: its own
    ("device", CPU, 1 * GIB, None, CPU),         # a CPU run encodes on the CPU
])
def test_where_captions_are_encoded(setting, device, encoder, card, expected):
    assert encode_device(setting, device, encoder, card) == expected


def test_what_is_already_on_the_card_counts():
    """Qwen-Image in nf4 (about 11 GiB, quantized on the GPU as it loads) leaves no room for its
    16 GB text encoder on a 24 GB card; on a 48 GB one it does."""
    assert encode_device("auto", CUDA, 16 * GIB, 24 * GIB, resident=11 * GIB) == CPU
    assert encode_device("auto", CUDA, 16 * GIB, 24 * GIB, resident=0) == CUDA
    assert encode_device("auto", CUDA, 16 * GIB, 48 * GIB, resident=11 * GIB) == CUDA


def test_the_text_encoders_are_sized_from_the_loaded_pipeline(tiny_flux):
    pipeline = get_family("flux").load({"path": tiny_flux, "family": "flux", "dtype": "fp32",
                                        "quantize": "none"})
    expected = sum(p.numel() * 4 for name in ("text_encoder", "text_encoder_2")
                   for p in getattr(pipeline, name).parameters())
    assert text_encoder_bytes(pipeline) == expected > 0
    get_family("flux").free_text_encoders(pipeline)
    assert text_encoder_bytes(pipeline) == 0


@pytest.mark.parametrize("encode_on", ["cpu", "device", "auto"])
def test_captions_encode_where_the_decision_says_and_the_encoders_leave_before_training(
        encode_on, resolved, monkeypatch):
    family, seen = get_family("flux"), []
    elsewhere = torch.device("cpu", 0)  # the stand-in decision's answer: real, and not the run's `cpu`
    monkeypatch.setattr(setup, "caption_device", lambda fam, pipeline, setting, device: (
        seen.append(("asked", setting, device)), elsewhere)[1])
    for method in ("encoders_to_device", "encode_prompts", "to_device"):
        real = getattr(type(family), method)

        def spy(self, pipeline, *args, method=method, real=real):
            encoders = [getattr(pipeline, name) for name in ("text_encoder", "text_encoder_2")]
            seen.append((method, args[-1], any(e is not None for e in encoders)))
            return real(self, pipeline, *args)
        monkeypatch.setattr(type(family), method, spy)
    result = train(resolved(model={"encode_on": encode_on}, train={"steps": 2}))
    assert result.status == "finished"
    assert seen[0] == ("asked", encode_on, CPU)
    assert ("encoders_to_device", elsewhere, True) in seen
    encodes = [entry for entry in seen if entry[0] == "encode_prompts"]
    assert encodes and all(device == elsewhere for _, device, _ in encodes)
    # the trained model comes on the device with no text encoder left in the pipeline
    moves = [entry for entry in seen if entry[0] == "to_device"]
    assert moves and moves[0] == ("to_device", CPU, False)
    assert seen.index(moves[0]) > max(seen.index(entry) for entry in encodes)


def test_load_base_models_widget_sets_it():
    from test_nodes import call

    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none", encode_on="cpu")
    assert base.section["encode_on"] == "cpu"
    base, = call("LoRALabLoadBaseModel", family="flux", path="tiny-flux", dtype="fp32",
                 quantize="none")  # a workflow saved before the widget: the default
    assert base.section["encode_on"] == "auto"
