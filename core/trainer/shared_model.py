"""A base model that ComfyUI shares between nodes leaves train() as it was given: no LoRA, the
model's own forward, the same device, mode and gradient checkpointing, every weight frozen.
(Its text encoders are the exception: they are freed after encoding and load again on demand.)"""
import contextlib

from ..memory.offload import restore as restore_offloaded


@contextlib.contextmanager
def given_back_unchanged(family, pipeline):
    if pipeline is None:
        yield
        return
    model = family.trainable_model(pipeline)
    device, training = next(model.parameters()).device, model.training
    checkpointing = model.is_gradient_checkpointing
    try:
        yield
    finally:
        restore_offloaded(model)  # train.offload_blocks: every weight back in its module
        family.remove_lora(pipeline)
        vars(model).pop("forward", None)  # accelerate's mixed-precision wrapper, if still there
        if model.is_gradient_checkpointing and not checkpointing:
            model.disable_gradient_checkpointing()
        model.train(training)
        model.requires_grad_(False)
        family.to_device(pipeline, device)
