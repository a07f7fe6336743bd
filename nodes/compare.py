"""CompareRuns: the `loralab runs compare` view inside ComfyUI: loss curves on one plot, the
samples of the runs side by side, and the settings that differ."""
import os

from . import comfy_adapter
from .images import image_tensor

CATEGORY = "LoRA Lab"


def _entries(text):
    """Lines or commas of a STRING widget, blank ones dropped."""
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


def _note(text):
    """A small image with one line of text, for an IMAGE output that has nothing to show."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (480, 48), "white")
    ImageDraw.Draw(image).text((8, 16), text, fill="black")
    return image


class LoRALabCompareRuns:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "runs": ("STRING", {"multiline": True, "default": "", "tooltip":
                                "Run folders, one per line. Leave empty to use output_dir + names."}),
            "output_dir": ("STRING", {"default": "", "tooltip":
                                      "Folder holding the run folders; empty: ComfyUI's output folder."}),
            "names": ("STRING", {"default": "", "tooltip": "Run names inside output_dir, comma-separated."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("loss_plot", "samples", "differences")
    FUNCTION = "compare"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Compares training runs: loss curves on one plot, samples at matching steps "
                   "side by side, and the settings that differ (change one thing at a time).")

    def compare(self, runs, output_dir, names):
        from ..core.runs.compare import compare_runs
        from ..core.runs.history import locate_run

        output_dir = output_dir.strip() or comfy_adapter.output_directory()
        references = _entries(runs) or [os.path.join(output_dir, name) for name in _entries(names)]
        if len(references) < 2:
            raise ValueError("CompareRuns needs at least two runs: list run folders in `runs`, or "
                             "names (comma-separated) of runs inside output_dir in `names`.")
        comparison = compare_runs([locate_run(reference, output_dir) for reference in references])
        samples = comparison.samples_image or _note("no sample images in every run (sample_every 0)")
        return image_tensor(comparison.loss_image), image_tensor(samples), comparison.text()
