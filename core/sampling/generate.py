"""Sample images with a LoRA at given strengths, for given prompts, from fixed seeds, so images
at different steps and strengths compare like for like. Used by sample_every and SampleGrid."""
import os

from ..dataset.scan import apply_trigger
from ..lora import lora_strength
from ..io import save_image
from .grid import make_grid


def prompts_with_trigger(prompts, trigger_word):
    return [apply_trigger(p, trigger_word) if "[trigger]" in p else p for p in prompts]


def sample_images(family, pipeline, embeds, strengths, sample_config, device, text_encoders=()):
    """{strength: [image per prompt]}. A strength of 0 is the base model. The pipeline's model
    (and `text_encoders`, the modules of a text-encoder LoRA) must carry the LoRA (adapter
    "default") when a strength other than 0 is asked for. embeds() gives ([(text, pooled) per
    prompt], the empty caption's pair, the negative of families with classifier-free guidance);
    it is asked at each strength, so a text-encoder LoRA encodes the prompts at that strength."""
    model = family.trainable_model(pipeline)
    images = {}
    for strength in strengths:
        with lora_strength([model, *text_encoders], strength):
            prompt_embeds, negative_embeds = embeds()
            images[strength] = family.generate(
                pipeline, prompt_embeds, sample_config["seed"], sample_config["sample_steps"],
                sample_config["guidance_scale"], sample_config["width"], sample_config["height"],
                device, negative_embeds)
    return images


def encoded_now(family, pipeline, prompts, device):
    """([(text, pooled) per prompt], the empty caption's pair) from the text encoders as they are
    now, LoRA and all: sample_images' embeds() when a text-encoder LoRA trains. One prompt at a
    time, as the cache encodes them, so a LoRA at zero gives the cached values exactly."""
    encoded = family.encode_prompts(pipeline, list(prompts) + [""], device)
    return [encoded[prompt] for prompt in prompts], encoded[""]


def grid_of(images, prompts, title=None):
    strengths = list(images)
    rows = [[images[s][p] for s in strengths] for p in range(len(prompts))]
    labels = ["base" if s == 0 else f"strength {s:g}" for s in strengths]
    return make_grid(rows, prompts, labels, title=title)


def save_samples(folder, images, prompts):
    """Writes <folder>/<prompt index>_<strength>.png; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for strength, per_prompt in images.items():
        for index, image in enumerate(per_prompt):
            path = os.path.join(folder, f"{index:02d}_s{strength:g}.png")
            paths.append(save_image(image, path))
    return paths
