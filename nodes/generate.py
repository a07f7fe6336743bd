"""Seeing what a LoRA learned: SampleGrid draws base vs LoRA strengths; ApplyLoRA hands the
LoRA to ComfyUI's own sampling."""
import os

from ..core.config.strengths import MAX_STRENGTHS, STRENGTH_RANGE, parse_strengths
from . import comfy_adapter
from .errors import one_line_errors
from .graph_use import HIDDEN_INPUTS
from .images import image_tensor
from .output_files import numbered_file
from .schema_widgets import checked, config_from, setting, widget_inputs

CATEGORY = "LoRA Lab"


class LoRALabSampleGrid:
    SETTINGS = {
        "prompts": setting("sample.prompts"),
        "seed": setting("sample.seed", control_after_generate="fixed"),
        "steps": setting("sample.sample_steps"),
        "guidance": setting("sample.guidance_scale", step=0.1),
        "width": setting("sample.width", step=16),
        "height": setting("sample.height", step=16),
    }
    STRENGTHS_TOOLTIP = (f"LoRA strengths, one column each; 0 is the base model. Numbers from "
                         f"{STRENGTH_RANGE[0]:g} to {STRENGTH_RANGE[1]:g}, up to {MAX_STRENGTHS}.")

    @classmethod
    def INPUT_TYPES(cls):
        widgets = widget_inputs(cls.SETTINGS)
        return {"required": {"base_model": ("LORALAB_BASE_MODEL",),
                             "prompts": widgets.pop("prompts"),
                             "strengths": ("STRING", {"default": "0,0.5,1",
                                                      "tooltip": cls.STRENGTHS_TOOLTIP}),
                             **widgets},
                "optional": {"lora": ("LORALAB_LORA", {
                    "tooltip": "The LoRA to compare with the base model; without it, only the "
                               "base model's column is drawn."})},
                "hidden": HIDDEN_INPUTS}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    FUNCTION = "sample"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("One labelled grid: rows are prompts ([trigger] replaced), columns LoRA "
                   "strengths, all from the same seed. Saved as a PNG in the output folder.")

    @staticmethod
    def _draw(base_model, strengths, sample_config, trained, trigger_word, title):
        """The grid; the pipeline is named only here, so the caller can free it afterwards."""
        from ..core.memory import caption_device
        from ..core.sampling import strength_grid

        pipeline, family, device = base_model.pipeline(), base_model.family, comfy_adapter.torch_device()
        text_device = caption_device(family, pipeline, base_model.section.get("encode_on", "auto"), device)
        return strength_grid(family, pipeline, sample_config["prompts"], strengths, sample_config, device,
                             lora=trained, trigger_word=trigger_word, title=title,
                             text_device=text_device)[0]

    @classmethod
    def VALIDATE_INPUTS(cls, strengths):
        try:
            parse_strengths(strengths)
        except ValueError as error:
            return str(error)
        return True

    def sample(self, base_model, prompts, strengths, lora=None, prompt=None, unique_id=None, **values):
        with one_line_errors("LoRA Lab SampleGrid"):
            return self._sample(base_model, prompts, strengths, lora, (prompt, unique_id), **values)

    def _sample(self, base_model, prompts, strengths, lora, graph_place, **values):
        sample_config = checked(config_from(self.SETTINGS, {"prompts": prompts, **values}))["sample"]
        if not sample_config["prompts"]:
            raise ValueError("prompts is empty: give one prompt per line")
        trained = None if lora is None else {"weights": lora.weights, "network": lora.config["network"]}
        title = (f"{lora.name} step {lora.step}" if lora else "base model") + f", seed {values['seed']}"
        try:
            with comfy_adapter.outside_inference_mode():  # it moves the pipeline
                grid = self._draw(base_model, parse_strengths(strengths), sample_config, trained,
                                  lora.trigger_word if lora else "", title)
        finally:
            base_model.release_after(*graph_place)
        output = comfy_adapter.output_directory()
        path = numbered_file(output, f"{lora.name if lora else 'base_model'}/grid", ".png")
        grid.save(path)
        shown = {"filename": os.path.basename(path), "type": "output",
                 "subfolder": os.path.relpath(os.path.dirname(path), output)}
        return {"ui": {"images": [shown]}, "result": (image_tensor(grid),)}


class LoRALabApplyLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora": ("LORALAB_LORA",),
            "strength": ("FLOAT", {"default": 1.0, "min": STRENGTH_RANGE[0], "max": STRENGTH_RANGE[1], "step": 0.01,
                                   "tooltip": "How strongly the LoRA changes the model; 0 is "
                                              "the model unchanged."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "ComfyUI's CLIP, for a LoRA trained with a text-encoder "
                                         "LoRA (SDXL/SD1.5): patched at the same strength. "
                                         "Without it only the MODEL is patched."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")  # CLIP second: links to the MODEL output stay where they were
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Patches a ComfyUI MODEL (and CLIP, when connected) with the trained LoRA "
                   "(through ComfyUI's LoRA loading), so the graph that trained it can generate "
                   "with it. ComfyUI only.")

    def apply(self, model, lora, strength, clip=None):
        # ComfyUI maps every key of either format (kohya, diffusers) for every family
        tensors = lora.tensors(fmt=lora.config["save"]["format"], dtype="float32")
        return tuple(comfy_adapter.patch_model_with_lora(model, tensors, strength, clip))
