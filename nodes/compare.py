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


def _run_folders(runs, output_dir, names):
    """The run folders the inputs name, each resolved inside ComfyUI's output folder (headless:
    ./output): a name or relative folder, never an absolute path, `..` or a link leading out.
    ValueError names the input and the entry."""
    from ..core.io import inside

    root = comfy_adapter.output_directory()
    folder = inside(root, output_dir.strip(), "output_dir") if output_dir.strip() else root
    folders = ([inside(root, entry, "runs") for entry in _entries(runs)]
               or [inside(folder, name, "names") for name in _entries(names)])
    for path in folders:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"no run {os.path.relpath(path, root)!r} in the output folder {root}: "
                             "give run names as `loralab runs list` shows them")
    return folders


class LoRALabCompareRuns:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "runs": ("STRING", {"multiline": True, "default": "", "tooltip":
                                "Run folders inside the output folder, one per line. Leave empty "
                                "to use output_dir + names."}),
            "output_dir": ("STRING", {"default": "", "tooltip":
                                      "A folder inside ComfyUI's output folder holding the run "
                                      "folders; empty: the output folder itself."}),
            "names": ("STRING", {"default": "", "tooltip": "Run names inside output_dir, comma-separated."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("loss_plot", "samples", "differences")
    FUNCTION = "compare"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Compares training runs: loss curves on one plot, samples at matching steps "
                   "side by side, and the settings that differ (change one thing at a time).")

    @classmethod
    def VALIDATE_INPUTS(cls, runs, output_dir, names):
        """Run names resolve only inside the output folder: checked before anything runs."""
        from ..core.io import name_problem

        if not all(isinstance(value, str) for value in (runs, output_dir, names)):
            return "runs, output_dir and names must be text"
        entries = [("runs", entry) for entry in _entries(runs)] + [("names", n) for n in _entries(names)]
        if output_dir.strip():
            entries.append(("output_dir", output_dir.strip()))
        problems = (name_problem(label, entry) for label, entry in entries)
        return next((problem for problem in problems if problem), True)

    def compare(self, runs, output_dir, names):
        from ..core.runs.compare import compare_runs

        folders = _run_folders(runs, output_dir, names)
        if len(folders) < 2:
            raise ValueError("CompareRuns needs at least two runs: list run folders in `runs`, or "
                             "names (comma-separated) of runs inside output_dir in `names`.")
        comparison = compare_runs(folders)
        samples = comparison.samples_image or _note("no sample images in every run (sample_every 0)")
        return image_tensor(comparison.loss_image), image_tensor(samples), comparison.text()
