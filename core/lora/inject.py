"""Put a LoRA on a model with peft, read it out, put weights back, and scale it for sampling."""
import contextlib

from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

ADAPTER = "default"


def add_lora(model, rank, alpha, targets):
    """Adds a trainable LoRA (peft, adapter "default") to the modules that `targets` (the family's
    lora_targets: target_modules, and rank/alpha patterns for modules with their own rank)
    names; the LoRA parameters are float32 whatever the base dtype, so small updates are not
    rounded away. A plain regex string is target_modules alone."""
    targets = {"target_modules": targets} if isinstance(targets, str) else targets
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, **targets))
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
    """Every LoRA adapter of `model` at weight `strength` (0 = the base model) for the duration,
    through diffusers' set_adapters (the transformer's or UNet's PeftAdapterMixin); afterwards
    the same adapters are active at weight 1, as add_lora and load_lora_weights leave them."""
    if not getattr(model, "peft_config", None):  # no LoRA on it: the base model at any strength
        yield model
        return
    adapters = model.active_adapters()
    try:
        model.set_adapters(adapters, [strength] * len(adapters))
        yield model
    finally:
        model.set_adapters(adapters, [1.0] * len(adapters))

