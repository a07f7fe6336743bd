"""Put a LoRA on a model with peft, read it out, put weights back, and scale it for sampling."""
import contextlib

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

ADAPTER = "default"


def add_lora(model, rank, alpha, targets):
    """Adds a trainable LoRA (peft, adapter "default") to the modules matching `targets`; the LoRA
    parameters are float32 whatever the base dtype, so small updates are not rounded away."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                 init_lora_weights=True))
    parameters = [p for n, p in model.named_parameters() if "lora_" in n]
    for parameter in parameters:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return parameters


def lora_weights(model):
    """The LoRA weights as peft names it (`blocks.0.attn.to_q.lora_A.weight`), float32 on the CPU."""
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_weights(model, weights):
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA weights do not fit the model: {unexpected[:5]}")


@contextlib.contextmanager
def lora_strength(model, strength):
    """Scales every LoRA layer of `model` by `strength` (0 = the base model) for the duration."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "scaling")]
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            for adapter in layer.scaling:
                layer.scaling[adapter] = layer.scaling[adapter] * strength
        yield model
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)


TORCH_SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
