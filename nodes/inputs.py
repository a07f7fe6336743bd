"""The nodes that prepare a training run: dataset, base model, LoRA settings."""
import os

from ..core.demo import BUILTIN_DATASETS
from ..core.families.builtin import BUILTIN_MODELS
from . import comfy_adapter
from .output_files import path_problem
from ..core.config import field, resolve
from .schema_widgets import PLACEHOLDERS, checked, config_from, setting, widget_inputs
from .values import BaseModel, DatasetSettings, TrainingSettings

CATEGORY = "LoRA Lab"


def named_folder(label, name, builtins, roots, missing):
    """(the folder for the config, None) or (None, a one-line problem naming the input): a
    built-in name as is, else a folder inside one of `roots` (ComfyUI's folders for it). An
    absolute path, `..` or a link leading out gets the same refusal whether or not it exists."""
    from ..core.io import UnsafePath, folder_inside

    problem = path_problem(label, name)
    if problem:
        return None, problem
    if name in builtins:
        return name, None
    try:
        folder = folder_inside(roots, name, label)
    except UnsafePath as error:
        return None, str(error)
    return (folder, None) if folder else (None, f"{label}: {missing(name)}")


def dataset_folder(label, name):
    """named_folder for LoadDataset's folders: built-in names, or ComfyUI's input folder (as its
    own LoadImageDataSetFromFolder reads); headless $LORALAB_INPUT or ./input."""
    root = comfy_adapter.input_directory()
    return named_folder(label, name, BUILTIN_DATASETS, [root], lambda name: (
        f"dataset folder {name!r} not found in the input folder {root}. Put the folder of images "
        "with same-name caption files there and give its name (headless: loralab run "
        "--input-dir DIR), or builtin:demo to try."))


class LoRALabLoadDataset:
    SETTINGS = {
        "folder": setting("dataset.folder", tooltip=(
            f"{field('dataset.folder')['description']} By name, inside ComfyUI's input folder "
            "(my_dataset for input/my_dataset), or builtin:demo.")),
        "caption_ext": setting("dataset.caption_ext"),
        "trigger_word": setting("dataset.trigger_word"),
        "repeats": setting("dataset.repeats"),
        "resolution": setting("dataset.resolution"),
        "caption_dropout_rate": setting("dataset.caption_dropout_rate", step=0.01),
    }
    OPTIONAL_SETTINGS = {  # after the others, so saved UI workflows keep their order
        "validation_images": setting("dataset.validation_images"),
        "regularization_folder": setting("dataset.regularization_folder", tooltip=(
            f"{field('dataset.regularization_folder')['description']} A folder inside ComfyUI's "
            "input folder; empty: none.")),
        "regularization_ratio": setting("dataset.regularization_ratio", step=0.05),
        "regularization_weight": setting("dataset.regularization_weight", step=0.05),
        "mask_folder": setting("dataset.mask_folder"),
        "alpha_mask": setting("dataset.alpha_mask"),
        "mask_min": setting("dataset.mask_min", step=0.05),
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": widget_inputs(cls.SETTINGS), "optional": widget_inputs(cls.OPTIONAL_SETTINGS)}

    RETURN_TYPES = ("LORALAB_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "A folder of images with same-name caption files, checked and summarised."

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        """The folder's listing with sizes and times, so ComfyUI reruns (and TrainLoRA after it)
        when images or captions change under the same path."""
        path, _problem = dataset_folder("folder", folder)
        if path is None or not os.path.isdir(path):
            return folder
        folder = path
        return [(entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                for entry in sorted(os.scandir(folder), key=lambda e: e.name) if entry.is_file()]

    @classmethod
    def folders(cls, folder, regularization_folder=""):
        """{widget: folder} resolved inside the input folder; ValueError names the input."""
        found = {"folder": dataset_folder("folder", folder)}
        if regularization_folder != "":
            found["regularization_folder"] = dataset_folder("regularization_folder", regularization_folder)
        problems = [problem for _, problem in found.values() if problem]
        if problems:
            raise ValueError(problems[0])
        return {widget: path for widget, (path, _) in found.items()}

    @classmethod
    def VALIDATE_INPUTS(cls, folder, regularization_folder=""):
        """Dataset folders resolve only inside the input folder: checked before anything runs."""
        try:
            cls.folders(folder, regularization_folder)
        except ValueError as error:
            return str(error)
        return True

    def load(self, **values):
        from ..core.coach.plan import plan_report

        section = checked(config_from({**self.SETTINGS, **self.OPTIONAL_SETTINGS}, values))["dataset"]
        section.update(self.folders(section["folder"], section.get("regularization_folder", "")))
        # the run plan with what this node knows: held-out and regularization images included
        return DatasetSettings(section), plan_report(section["folder"], {"dataset": section}) + self.fit(section)

    @staticmethod
    def fit(section):
        """Which quantize modes fit ComfyUI's GPU at these resolutions (FLUX.1-dev's shapes and
        the default LoRA settings; TrainLoRA decides with the real ones)."""
        from ..core.memory import device_memory, fit_report

        vram = device_memory(comfy_adapter.torch_device())
        if vram is None:
            return "\nmemory fit: no CUDA GPU, so training runs with model.quantize none."
        return "\n" + fit_report(resolve({**PLACEHOLDERS, "dataset": section}), vram)


class LoRALabLoadBaseModel:
    SETTINGS = {
        "family": setting("model.family"),
        "path": setting("model.path", tooltip=(
            f"{field('model.path')['description']} By name, inside ComfyUI's models/diffusers "
            "(or builtin:tiny-flux).")),
        "dtype": setting("model.dtype"),
        "quantize": setting("model.quantize"),
    }
    SD_SETTINGS = {  # optional, after the file widgets, so saved UI workflows keep their order
        "prediction_type": setting("model.prediction_type"),
        "clip_skip": setting("model.clip_skip"),
    }
    # widget -> (ComfyUI's folder kind, the config key it fills)
    FILES = {"diffusion_model": ("diffusion_models", "transformer_path"),
             "clip_l": ("text_encoders", "clip_l_path"),
             "t5": ("text_encoders", "t5_path"),
             "vae": ("vae", "vae_path"),
             "checkpoint": ("checkpoints", "checkpoint_path")}
    # file widgets added later stand after SD_SETTINGS, so saved UI workflows keep their order
    LATER_FILES = {"text_encoder": ("text_encoders", "text_encoder_path")}
    LATER_SETTINGS = {"encode_on": setting("model.encode_on")}  # after them, for the same reason

    @classmethod
    def INPUT_TYPES(cls):
        def file_widgets(files):
            return {widget: (comfy_adapter.file_choices(kind), {
                "default": comfy_adapter.NO_MODEL,
                "tooltip": f"{field('model.' + key)['description']} From ComfyUI's "
                           f"{' and '.join(comfy_adapter.FILE_FOLDERS[kind])} folders."})
                for widget, (kind, key) in files.items()}
        return {"required": widget_inputs(cls.SETTINGS),
                "optional": {"comfyui_model": (comfy_adapter.model_choices(), {
                    "default": comfy_adapter.NO_MODEL, "tooltip":
                    "A diffusers folder from ComfyUI's models/diffusers, used when path is empty."}),
                    **file_widgets(cls.FILES), **widget_inputs(cls.SD_SETTINGS),
                    **file_widgets(cls.LATER_FILES), **widget_inputs(cls.LATER_SETTINGS)}}

    RETURN_TYPES = ("LORALAB_BASE_MODEL",)
    RETURN_NAMES = ("base_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The frozen base model to train on, loaded once when first needed: an SDXL or "
                   "SD1.5 checkpoint, FLUX.1's single files (diffusion model, CLIP-L, T5, VAE), "
                   "Z-Image's or Qwen-Image's (diffusion model, text encoder, VAE), and/or a diffusers folder. "
                   "The family is read from the files (auto).")

    @classmethod
    def VALIDATE_INPUTS(cls, path, diffusion_model=comfy_adapter.NO_MODEL,
                        clip_l=comfy_adapter.NO_MODEL, t5=comfy_adapter.NO_MODEL,
                        vae=comfy_adapter.NO_MODEL, checkpoint=comfy_adapter.NO_MODEL,
                        text_encoder=comfy_adapter.NO_MODEL):
        """Checked before anything runs, so a wrong path fails before a long training."""
        chosen = {"diffusion_model": diffusion_model, "clip_l": clip_l, "t5": t5, "vae": vae,
                  "checkpoint": checkpoint, "text_encoder": text_encoder}
        for widget, name in chosen.items():
            kind = {**cls.FILES, **cls.LATER_FILES}[widget][0]
            if not isinstance(name, str):
                return f"{widget}: expected a file name from the list, found {type(name).__name__} {name!r:.40}"
            if name != comfy_adapter.NO_MODEL and comfy_adapter.file_choice_path(kind, name) is None:
                return (f"{widget}: {name!r} is not in ComfyUI's {kind} folders "
                        f"({', '.join(comfy_adapter.file_folders(kind))}). Put the file there "
                        "(headless: set LORALAB_MODELS to a ComfyUI models folder), or pick none.")
        path = (path or "").strip() if isinstance(path, str) or path is None else path
        if path == "":
            return True  # an empty path is checked when the node runs, with the files
        _, problem = cls.model_folder(path)
        return problem or True

    @staticmethod
    def model_folder(path):
        """named_folder for `path`: a built-in name, or a folder inside ComfyUI's diffusers
        folders (headless $LORALAB_MODELS/diffusers or ./models/diffusers)."""
        roots = comfy_adapter.file_folders("diffusers")
        return named_folder("path", path, BUILTIN_MODELS, roots, lambda name: (
            f"model folder {name!r} not found in ComfyUI's diffusers folders ({', '.join(roots)}). "
            "Put the base model's diffusers folder (the one holding model_index.json) there and "
            "give its name (headless: set LORALAB_MODELS to a ComfyUI models folder), or "
            "builtin:tiny-flux to try, or leave it empty and pick a checkpoint (SDXL/SD1.5) or "
            "the four FLUX.1 files."))

    @classmethod
    def model_section(cls, family, path, comfyui_model=comfy_adapter.NO_MODEL, **files):
        """The `model` section for these widgets; ValueError says what is wrong."""
        problem = cls.VALIDATE_INPUTS(path, **files)
        if problem is not True:
            raise ValueError(problem)
        path = (path or "").strip()
        section = {"family": family, "path": cls.model_folder(path)[0] if path else
                   comfy_adapter.model_choice_path(comfyui_model)}
        for widget, (kind, key) in {**cls.FILES, **cls.LATER_FILES}.items():
            section[key] = comfy_adapter.file_choice_path(kind, files.get(widget, comfy_adapter.NO_MODEL))
        return section  # what the family needs of it is checked by the config's rules

    def load(self, family, path, dtype, quantize, comfyui_model=comfy_adapter.NO_MODEL, **values):
        files = {widget: values.pop(widget) for widget in list(values)
                 if widget in self.FILES or widget in self.LATER_FILES}
        section = {**self.model_section(family, path, comfyui_model, **files), "dtype": dtype,
                   "quantize": quantize,
                   **config_from({**self.SD_SETTINGS, **self.LATER_SETTINGS}, values).get("model", {})}
        # resolved here, so the family read from the files ("auto") travels with the model
        return (BaseModel(resolve({**PLACEHOLDERS, "model": section})["model"]),)


class LoRALabConfigureLoRA:
    SETTINGS = {
        "linear": setting("network.linear"),
        "linear_alpha": setting("network.linear_alpha", step=0.5),
        "steps": setting("train.steps"),
        "batch_size": setting("train.batch_size"),
        "lr": setting("train.lr", step=0.000001, round=False),
        "optimizer": setting("train.optimizer"),
        "lr_scheduler": setting("train.lr_scheduler"),
        "save_every": setting("save.save_every"),
        "max_step_saves_to_keep": setting("save.max_step_saves_to_keep"),
        "save_dtype": setting("save.dtype"),
        "sample_every": setting("sample.sample_every"),
        "sample_prompts": setting("sample.prompts"),
        "sample_width": setting("sample.width", step=16),
        "sample_height": setting("sample.height", step=16),
        "sample_steps": setting("sample.sample_steps"),
        "performance_log_every": setting("logging.performance_log_every"),
        "seed": setting("train.seed", control_after_generate="fixed"),
        "timestep_type": setting("train.timestep_type"),
        "gradient_checkpointing": setting("train.gradient_checkpointing"),
        "train_dtype": setting("train.dtype"),
    }
    OPTIONAL_SETTINGS = {  # after the others, so saved UI workflows keep their order: SD's, then newer
        "feed_forward": setting("network.feed_forward"),
        "conv": setting("network.conv"),
        "conv_alpha": setting("network.conv_alpha", step=0.5),
        "noise_offset": setting("train.noise_offset", step=0.001, round=False),
        "min_snr_gamma": setting("train.min_snr_gamma", step=0.5),
        "timestep_min": setting("train.timestep_min"),
        "timestep_max": setting("train.timestep_max"),
        "zero_terminal_snr": setting("train.zero_terminal_snr"),
        "text_encoder": setting("network.text_encoder"),
        "text_encoder_lr": setting("train.text_encoder_lr", step=0.000001, round=False),
        "preservation_class": setting("train.preservation_class"),
        "preservation_weight": setting("train.preservation_weight", step=0.05, round=False),
        "network_type": setting("network.type"),
        "dora": setting("network.dora"),
        "lokr_factor": setting("network.lokr_factor"),
        "lokr_full_rank": setting("network.lokr_full_rank"),
        "ema": setting("train.ema"),
        "ema_decay": setting("train.ema_decay", step=0.0001, round=False),
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": widget_inputs(cls.SETTINGS), "optional": widget_inputs(cls.OPTIONAL_SETTINGS)}

    RETURN_TYPES = ("LORALAB_CONFIG",)
    RETURN_NAMES = ("config",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "LoRA and training settings; the defaults are the training guide's."

    def configure(self, **values):
        return (TrainingSettings(checked(config_from({**self.SETTINGS, **self.OPTIONAL_SETTINGS}, values))),)

