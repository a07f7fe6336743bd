"""A transformer LoRA in kohya's names under ComfyUI's `diffusion_model.` prefix, as Z-Image's and
FLUX.2's LoRA files are saved (ComfyUI maps `diffusion_model.<module>` to the model's own module)."""
import torch


def kohya_names(weights):
    """peft LoRA weights (alpha baked into lora_B) -> `diffusion_model.<module>.lora_down/lora_up`
    with `.alpha` = the rank, so the file's scale is 1."""
    named = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".lora_")
        if part == "A.weight":
            named[f"diffusion_model.{module}.lora_down.weight"] = value
            named[f"diffusion_model.{module}.alpha"] = torch.tensor(float(value.shape[0]))
        elif part == "B.weight":
            named[f"diffusion_model.{module}.lora_up.weight"] = value
        else:
            raise ValueError(f"not a LoRA weight: {key}")
    return named
