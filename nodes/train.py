"""Training and saving: TrainLoRA runs core.trainer.train; SaveCheckpoint writes the LoRA file
into the loras folder."""
import os

from ..core.config import resolve
from ..workflow_runner import interrupt
from . import comfy_adapter, events
from .errors import one_line_errors
from .graph_use import HIDDEN_INPUTS
from .images import image_tensor
from .output_files import check_prefix, numbered_file, path_problem
from .schema_widgets import config_from, setting, widget_inputs
from .values import TrainedLoRA

CATEGORY = "LoRA Lab"


class TrainingProgress:
    """Trainer events -> ComfyUI's progress bar (the newest sample as its preview) and the
    listeners of nodes.events (the headless printer)."""

    def __init__(self):
        self.bar = None

    def __call__(self, event):
        events.publish(event)
        kind = event["type"]
        if kind == "plan":
            self.bar = comfy_adapter.ProgressBar(event["steps"])
        elif self.bar is None:
            return
        elif kind in ("start", "step"):
            self.bar.update(event["step"])
        elif kind == "sample":
            self.bar.update(self.bar.value, preview=event["image"])


def stop_requested():
    """ComfyUI's Cancel, or the headless runner's Ctrl+C."""
    return comfy_adapter.interrupted() or interrupt.stop_requested()


class LoRALabTrainLoRA:
    SETTINGS = {"name": setting("name"), "resume": setting("train.resume")}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"base_model": ("LORALAB_BASE_MODEL",),
                             "dataset": ("LORALAB_DATASET",),
                             "config": ("LORALAB_CONFIG",),
                             **widget_inputs(cls.SETTINGS)},
                "hidden": HIDDEN_INPUTS}  # the graph: is the base model used after training?

    RETURN_TYPES = ("LORALAB_LORA", "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "loss_plot", "summary")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains the LoRA into a run folder in the output folder. Cancel stops within "
                   "a step and saves a checkpoint first; queue again to resume.")

    # what a run adds to its name: "-12" for a new folder, "_000001200.state.safetensors", temporaries
    NAME_RESERVE = 48

    @classmethod
    def VALIDATE_INPUTS(cls, name):
        """The run name names a folder and files: checked before anything runs."""
        return path_problem("name", name, cls.NAME_RESERVE, one_name=True) or True

    def train(self, base_model, dataset, config, name, resume, prompt=None, unique_id=None):
        with one_line_errors("LoRA Lab TrainLoRA"):
            return self._train(base_model, dataset, config, name, resume, (prompt, unique_id))

    def _train(self, base_model, dataset, config, name, resume, graph_place):
        # imported here: peft and diffusers take seconds, and ComfyUI imports every pack at start
        from ..core.coach.summary import run_summary
        from ..core.runs import RunFolder
        from ..core.runs.plot import loss_plot
        from ..core.trainer import train

        raw = config_from(self.SETTINGS, {"name": name, "resume": resume})
        for section, values in config.sections.items():
            raw[section] = {**values, **raw.get(section, {})}
        raw.update(model=base_model.section, dataset=dataset.section)
        raw["save"] = {**raw.get("save", {}), "output_dir": comfy_adapter.output_directory()}
        resolved = resolve(raw)
        family = base_model.family
        try:  # no name holds the pipeline here, so release() can free it
            with comfy_adapter.outside_inference_mode():
                result = train(resolved, pipeline=base_model.pipeline(resolved),
                               on_event=TrainingProgress(), should_stop=stop_requested)
            to_kohya = family.lora_to_kohya(family.trainable_model(base_model.loaded))
        finally:
            base_model.release_after(*graph_place)
        if result.status == "interrupted":
            comfy_adapter.raise_if_interrupted()
        metrics = RunFolder(*os.path.split(result.run_folder)).read_metrics()  # may be <name>-2
        lora = TrainedLoRA(name, result.weights, resolved, result.step, result.status,
                           result.lora_path, result.run_folder,
                           to_kohya=to_kohya)
        summary = run_summary(result, metrics)
        events.publish({"type": "summary", "name": name, "text": summary})
        return lora, image_tensor(loss_plot(metrics, title=f"{name} loss")), summary


class LoRALabSaveCheckpoint:
    PREFIX_TOOLTIP = ("File name inside ComfyUI's loras folder (so LoraLoader lists it), without "
                      "extension; [name] becomes the LoRA's name and a counter is added.")
    PIN_TOOLTIP = ("Also keep this LoRA's step checkpoint in its run folder out of rotation "
                   "(as `loralab runs pin` does), as a backup of a version worth keeping.")
    FORMAT_TOOLTIP = ("Key names: diffusers (PEFT keys, the FLUX default; ComfyUI and diffusers "
                      "load it) or kohya (lora_unet_..., with alpha keys).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORALAB_LORA",),
            "filename_prefix": ("STRING", {"default": "loralab/[name]", "tooltip": cls.PREFIX_TOOLTIP}),
            "dtype": setting("save.dtype").widget(),
            "format": setting("save.format", tooltip=cls.FORMAT_TOOLTIP).widget(),
            "pin": ("BOOLEAN", {"default": False, "tooltip": cls.PIN_TOOLTIP}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Writes the trained LoRA as <prefix>_<counter>.safetensors into the loras folder."

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        try:
            check_prefix(filename_prefix.replace("[name]", "lora")
                         if isinstance(filename_prefix, str) else filename_prefix)
        except ValueError as error:
            return str(error)
        return True

    def save(self, lora, filename_prefix, dtype, format, pin=False):
        from ..core.runs import RunFolder
        from ..core.trainer import write_lora

        run = RunFolder(*os.path.split(lora.run_folder))
        if pin and os.path.isfile(run.checkpoint(lora.step)):  # a finished LoRA is never rotated
            run.pin(lora.step)

        path = numbered_file(comfy_adapter.loras_directory(),
                             filename_prefix.replace("[name]", lora.name), ".safetensors")
        write_lora(path, lora.weights, lora.config, lora.step, lora.to_kohya, format, dtype)
        return {"ui": {"text": [path]}, "result": (path,)}
