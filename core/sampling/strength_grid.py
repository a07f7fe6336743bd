"""One labelled grid of a LoRA at several strengths (SampleGrid): rows are prompts, columns are
strengths, 0 is the base model. Every cell starts from the same seed, so cells compare like for
like."""
from ..lora import add_lora, load_lora_weights
from .generate import grid_of, prompts_with_trigger, sample_images


def strength_grid(family, pipeline, prompts, strengths, sample_config, device, lora=None,
                  trigger_word="", title=None):
    """Returns (grid image, {strength: [image per prompt]}).

    lora: None (the base model alone: one column) or a dict with the float32 peft `weights`
    and the `network` config section it was trained with. sample_config: seed, sample_steps, guidance_scale,
    width, height. The pipeline is left as it was found: no LoRA on it, text encoders freed (loaded again for the next prompts).
    """
    prompts = prompts_with_trigger(prompts, trigger_word)
    family.encoders_to_device(pipeline, device)
    encoded = family.encode_prompts(pipeline, prompts + [""], device)  # "": the negative
    family.free_text_encoders(pipeline)  # done: freed before the transformer comes on
    family.to_device(pipeline, device)
    model = family.trainable_model(pipeline)
    family.remove_lora(pipeline)  # nothing else may add to the strengths asked for
    if lora is None:
        strengths = [0.0]
    else:
        network = lora["network"]
        add_lora(model, network["linear"], network["linear_alpha"], family.lora_targets(network))
        load_lora_weights(model, lora["weights"])
    model.eval()
    try:
        images = sample_images(family, pipeline, [encoded[p] for p in prompts], strengths,
                               sample_config, device, negative_embeds=encoded[""])
    finally:
        family.remove_lora(pipeline)
    return grid_of(images, prompts, title=title), images
