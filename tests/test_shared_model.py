"""A base model shared with train() (ComfyUI's LoadBaseModel output) comes back as it was given:
trained in bf16 with checkpointing, it then samples in fp32 exactly like a freshly loaded one."""
import numpy
import torch

from loralab.core.families.flux import FAMILY as flux
from loralab.core.sampling import strength_grid
from loralab.core.trainer import train

SAMPLE = {"seed": 3, "sample_steps": 2, "guidance_scale": 4.0, "width": 64, "height": 64}


def state(pipeline):
    transformer = pipeline.transformer
    return {"types": [type(m).__name__ for m in transformer.modules()],
            "dtypes": {p.dtype for p in transformer.parameters()},
            "devices": {p.device for p in transformer.parameters()},
            "trainable": sum(p.requires_grad for p in transformer.parameters()),
            "training": transformer.training, "checkpointing": transformer.is_gradient_checkpointing,
            "own forward": "forward" not in vars(transformer)}


def test_a_shared_pipeline_trained_in_bf16_samples_in_fp32_like_a_fresh_one(resolved, tiny_flux):
    shared, fresh = (flux.load({"path": tiny_flux, "dtype": "fp32"}) for _ in range(2))
    before = state(shared)
    config = resolved(train={"steps": 3, "dtype": "bf16", "gradient_checkpointing": True},
                      sample={"sample_every": 1, "width": 64, "height": 64, "sample_steps": 2})
    assert train(config, pipeline=shared).status == "finished"
    assert state(shared) == before
    assert all(torch.equal(a, b) for a, b in zip(shared.transformer.state_dict().values(),
                                                 fresh.transformer.state_dict().values()))
    _, images = strength_grid(flux, shared, ["a photo of sks"], [0.0], SAMPLE, "cpu")
    _, reference = strength_grid(flux, fresh, ["a photo of sks"], [0.0], SAMPLE, "cpu")
    assert numpy.array_equal(numpy.asarray(images[0.0][0]), numpy.asarray(reference[0.0][0]))
