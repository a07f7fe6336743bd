"""Put a LoRA on a model with peft, read it out, put weights back, and scale it for sampling.

A LoRA's weights are one dict in peft's names: the trainable model's (transformer, UNet)
unprefixed, a text encoder's prefixed by its pipeline attribute (`text_encoder.`,
`text_encoder_2.`), as diffusers' save_lora_weights names them."""
import contextlib

import torch

# peft and diffusers are imported in the functions that use them: with them, importing a family
# (which names its LoRA keys through lora/files.py) took 3 s, and `loralab plan` or a config check
# need neither

ADAPTER = "default"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline attributes diffusers prefixes
ADAPTER_PARAMETERS = ("lora_", "lokr_", "hada_")     # peft's LoRA (and DoRA), LoKr, LoHa tensors
# LyCORIS's "full matrix" LoKr is a dim above every factor's size: peft then keeps both factors
# whole; alpha = dim keeps the scale at 1, as LyCORIS does in that mode.
LOKR_FULL_RANK = 100000
DORA_SCALE = ".dora_scale"  # ComfyUI's DoRA magnitude (see dora_scales), derived, never trained


def text_encoder_of(key):
    """The text encoder a LoRA weight belongs to (its prefix), or None for the trainable model's."""
    prefix = key.split(".", 1)[0]
    return prefix if prefix in TEXT_ENCODERS else None


def text_encoder_names(weights):
    """The text encoders that `weights` hold a LoRA for."""
    return sorted({text_encoder_of(key) for key in weights} - {None})


def _float32_trainable(model):
    """The LoRA parameters of `model`, float32 whatever the base dtype, so small updates are not
    rounded away, and trainable."""
    parameters = [p for n, p in model.named_parameters() if any(a in n for a in ADAPTER_PARAMETERS)]
    for parameter in parameters:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return parameters


def adapter_config(rank, alpha, targets, network=None):
    """peft's config of the adapter that the `network` section's type asks for (lora, with dora;
    lokr; loha) on the modules `targets` (the family's lora_targets: target_modules, and rank/alpha
    patterns for modules with their own rank). A plain regex string is target_modules alone."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = {"target_modules": targets} if isinstance(targets, str) else dict(targets)
    network = network or {}
    kind = network.get("type", "lora")
    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                          use_dora=bool(network.get("dora")), **targets)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, **targets)
    if kind == "lokr":
        if network.get("lokr_full_rank"):
            rank = alpha = LOKR_FULL_RANK
        return LoKrConfig(r=rank, alpha=alpha, decompose_factor=network.get("lokr_factor", -1), **targets)
    raise ValueError(f"network.type {kind!r} is not one of lora, lokr, loha")


def adapter_parameters(inputs, outputs, network):
    """Trainable parameters of adapter_config's adapter on one linear (inputs -> outputs), as
    peft builds it: LoRA r x (in + out) (+ out for DoRA's magnitude); LoHa two such pairs; LoKr
    w1 (out_a x in_a) whole beside w2 (out_b x in_b) whole or as a rank-r pair, the dimensions
    split by peft's own factorization with network.lokr_factor."""
    rank, kind = network["linear"], network.get("type", "lora")
    if kind == "loha":
        return 2 * rank * (inputs + outputs)
    if kind == "lokr":
        from peft.tuners.lokr.layer import factorization

        rank = LOKR_FULL_RANK if network.get("lokr_full_rank") else rank
        (in_a, in_b), (out_a, out_b) = (factorization(n, network.get("lokr_factor", -1)) for n in (inputs, outputs))
        whole_w2 = rank >= max(out_b, in_b) / 2  # peft's rule
        return out_a * in_a + (out_b * in_b if whole_w2 else rank * (out_b + in_b))
    return rank * (inputs + outputs) + (outputs if network.get("dora") else 0)


def add_lora(model, rank, alpha, targets, network=None):
    """Adds a trainable adapter (peft, adapter "default"; adapter_config's type) to `model`."""
    model.add_adapter(adapter_config(rank, alpha, targets, network))
    return _float32_trainable(model)


def add_text_encoder_lora(text_encoders, rank, alpha, targets, network=None):
    """add_lora for the text encoders {name: transformers model}; peft 0.21's add_adapter fails on
    transformers models, so the adapter is injected with peft directly (as diffusers does)."""
    from peft import inject_adapter_in_model

    parameters = []
    for encoder in text_encoders.values():
        inject_adapter_in_model(adapter_config(rank, alpha, targets, network), encoder, adapter_name=ADAPTER)
        parameters += _float32_trainable(encoder)
    return parameters


def lora_weights(model, text_encoders=None):
    """The LoRA weights of `model` and of `text_encoders` {name: module} as peft names them
    (`blocks.0.attn.to_q.lora_A.weight`, `text_encoder.encoder.layers.0...`), float32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    parts = {"": model, **{name + ".": encoder for name, encoder in (text_encoders or {}).items()}}
    return {prefix + k: v.detach().float().cpu().clone()
            for prefix, part in parts.items()
            for k, v in {**get_peft_model_state_dict(part), **dora_scales(part)}.items()}


@torch.no_grad()
def dora_scales(model):
    """{module.dora_scale: tensor} of `model`'s DoRA layers, in ComfyUI's form. peft computes
    m * (W + dW) / ||W + dW|| (row norms); ComfyUI's weight_decompose (dora_scale with one entry
    per output row) computes dora_scale * (W + dW) / ||W||, the base weight's norm. So
    dora_scale = m * ||W|| / ||W + dW|| gives peft's weight exactly, for this base model."""
    scales = {}
    for name, module in model.named_modules():
        magnitude = getattr(module, "lora_magnitude_vector", None)
        if not magnitude or ADAPTER not in magnitude:
            continue
        weight = module.get_base_layer().weight.float()
        merged = weight + module.get_delta_weight(ADAPTER).float()
        rows = (weight.shape[0],) + (1,) * (weight.dim() - 1)

        def norm(w):
            return w.reshape(w.shape[0], -1).norm(dim=1).reshape(rows)

        m = magnitude[ADAPTER].weight.float().reshape(rows)
        scales[name + DORA_SCALE] = (m * norm(weight) / norm(merged)).cpu()
    return scales


def load_lora_weights(model, weights, text_encoders=None):
    """Puts lora_weights' `weights` back on `model` and `text_encoders`; a weight that fits none
    of them raises ValueError."""
    from peft.utils import set_peft_model_state_dict

    text_encoders = text_encoders or {}
    weights = {k: v for k, v in weights.items() if not k.endswith(DORA_SCALE)}  # derived, not state
    missing = [name for name in text_encoder_names(weights) if name not in text_encoders]
    if missing:
        raise ValueError(f"LoRA weights for {', '.join(missing)}, which has no LoRA here")
    own = {k: v for k, v in weights.items() if text_encoder_of(k) is None}
    parts = [(model, own)] + [(encoder, {k[len(name) + 1:]: v for k, v in weights.items()
                                         if text_encoder_of(k) == name})
                              for name, encoder in text_encoders.items()]
    for part, part_weights in parts:
        result = set_peft_model_state_dict(part, part_weights)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"LoRA weights do not fit the model: {unexpected[:5]}")


@contextlib.contextmanager
def lora_strength(models, strength):
    """Every LoRA layer of `models` (one model or a list: the transformer or UNet, the text
    encoders) at weight `strength` (0 = the base model) for the duration, the way diffusers'
    set_adapters weights them; afterwards at weight 1, as add_lora and load_lora_weights leave
    them."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    models = [m for m in (models if isinstance(models, (list, tuple)) else [models])
              if getattr(m, "peft_config", None)]  # a model without a LoRA is the base at any strength
    try:
        for model in models:
            adapters = list(model.peft_config)
            set_weights_and_activate_adapters(model, adapters, [strength] * len(adapters))
        yield
    finally:
        for model in models:
            adapters = list(model.peft_config)
            set_weights_and_activate_adapters(model, adapters, [1.0] * len(adapters))
