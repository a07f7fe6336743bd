"""One labelled grid of a LoRA at several strengths (SampleGrid): rows are prompts, columns are
strengths, 0 is the base model. Every cell starts from the same seed, so cells compare like for
like."""
from ..lora import add_lora, add_text_encoder_lora, load_lora_weights, text_encoder_names
from ..config.strengths import check_strengths
from .generate import encoded_now, grid_of, prompts_with_trigger, sample_images


def strength_grid(family, pipeline, prompts, strengths, sample_config, device, lora=None,
                  trigger_word="", title=None, text_device=None):
    """Returns (grid image, {strength: [image per prompt]}).

    lora: None (the base model alone: one column) or a dict with the float32 peft `weights`
    and the `network` config section it was trained with; weights for the text encoders put a
    LoRA on them too, at the same strength. sample_config: seed, sample_steps, guidance_scale,
    width, height. The pipeline is left as it was found: no LoRA on it, text encoders freed
    (loaded again for the next prompts) unless a text-encoder LoRA needed them. text_device: where
    the prompts are encoded (model.encode_on; default `device`); a text-encoder LoRA's are encoded
    on `device`, once per strength.
    """
    check_strengths(strengths)
    prompts = prompts_with_trigger(prompts, trigger_word)
    weights = lora["weights"] if lora else {}
    family.remove_lora(pipeline)  # nothing else may add to the strengths asked for
    names = text_encoder_names(weights)
    text_device = device if names or text_device is None else text_device
    family.encoders_to_device(pipeline, text_device)
    if names:  # a text-encoder LoRA: the prompts' embeddings depend on the strength, so each encodes
        text_encoders = {name: family.text_encoders(pipeline)[name] for name in names}
        add_text_encoder_lora(text_encoders, lora["network"]["linear"], lora["network"]["linear_alpha"],
                              family.text_encoder_lora_targets(lora["network"]), lora["network"])
        embeds = lambda: encoded_now(family, pipeline, prompts, device)
    else:
        text_encoders, encoded = {}, encoded_now(family, pipeline, prompts, text_device)  # once for all
        family.free_text_encoders(pipeline)  # done: freed before the transformer comes on
        embeds = lambda: encoded
    family.to_device(pipeline, device)
    model = family.trainable_model(pipeline)
    if lora is None:
        strengths = [0.0]
    else:
        network = lora["network"]
        add_lora(model, network["linear"], network["linear_alpha"], family.lora_targets(network), network)
        load_lora_weights(model, weights, text_encoders)
    model.eval()
    try:
        images = sample_images(family, pipeline, embeds, strengths, sample_config, device,
                               list(text_encoders.values()))
    finally:
        family.remove_lora(pipeline)
    return grid_of(images, prompts, title=title), images
