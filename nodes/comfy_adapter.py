"""Everything the nodes do differently inside ComfyUI, in one place: progress bar, interrupt,
output and loras folders, model lists, patching a ComfyUI MODEL. Outside ComfyUI (comfy not
importable) each function falls back to a plain local behaviour or does nothing."""
import contextlib
import functools
import importlib
import os

MODEL_FOLDERS = ("diffusers",)  # searched for diffusers folders (model_index.json)
# ComfyUI's folder kind -> its folders under models/ (folder_paths merges unet into
# diffusion_models and clip into text_encoders); headless, they are looked for under
# $LORALAB_MODELS or ./models.
FILE_FOLDERS = {"diffusion_models": ("diffusion_models", "unet"),
                "text_encoders": ("text_encoders", "clip"), "vae": ("vae",),
                "checkpoints": ("checkpoints",), "diffusers": ("diffusers",)}
NO_MODEL = "none"
PREVIEW_SIZE = 512  # ComfyUI's --preview-size default, used when its args cannot be read


@functools.cache
def _comfy(module):
    """A ComfyUI module, or None when ComfyUI is not importable."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def forget_imports():
    """Look again: `loralab run --comfyui` makes ComfyUI importable after start-up."""
    _comfy.cache_clear()


# -- folders ------------------------------------------------------------------------------------

def output_directory():
    """Where run folders and grids go: ComfyUI's output folder, else ./output."""
    folder_paths = _comfy("folder_paths")
    return folder_paths.get_output_directory() if folder_paths else os.path.abspath("output")


def input_directory():
    """Where dataset folders go: ComfyUI's input folder, else $LORALAB_INPUT (`loralab run
    --input-dir`) or ./input."""
    folder_paths = _comfy("folder_paths")
    if folder_paths:
        return folder_paths.get_input_directory()
    return os.path.abspath(os.environ.get("LORALAB_INPUT") or "input")


def loras_directory():
    """ComfyUI's first loras folder (so LoraLoader lists what is saved), else ./output/loras."""
    folder_paths = _comfy("folder_paths")
    if folder_paths:
        return folder_paths.get_folder_paths("loras")[0]
    return os.path.join(output_directory(), "loras")


def ui_file_path(entry):
    """The file of a node's {"filename", "subfolder", "type"} ui entry (type output, temp or
    input, as ComfyUI's /view reads it); headless every type is under the output folder."""
    folder_paths = _comfy("folder_paths")
    root = (folder_paths.get_directory_by_type(entry.get("type", "output"))
            if folder_paths else None) or output_directory()
    return os.path.join(root, entry.get("subfolder", ""), entry["filename"])


def model_choices():
    """Diffusers folders (holding model_index.json) in ComfyUI's models/diffusers, as
    "diffusers/<name>". Just NO_MODEL outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return [NO_MODEL]
    choices = []
    for kind in MODEL_FOLDERS:
        for base in folder_paths.get_folder_paths(kind):
            if os.path.isdir(base):
                choices += [f"{kind}/{name}" for name in sorted(os.listdir(base))
                            if os.path.isfile(os.path.join(base, name, "model_index.json"))]
    return [NO_MODEL] + choices


def model_choice_path(choice):
    """The full path of a model_choices() entry, or None (for anything not in that list)."""
    folder_paths = _comfy("folder_paths")
    if choice == NO_MODEL or not folder_paths or choice not in model_choices():
        return None
    kind, name = choice.split("/", 1)
    for base in folder_paths.get_folder_paths(kind):
        if os.path.exists(os.path.join(base, name)):
            return os.path.join(base, name)
    return None


def comfyui_folder():
    """ComfyUI's own folder (its source: comfy/ holds the CLIP and T5 tokenizers), or None
    outside ComfyUI."""
    folder_paths = _comfy("folder_paths")  # it sits in that folder (base_path may be elsewhere)
    source = getattr(folder_paths, "__file__", None)
    return os.path.dirname(os.path.abspath(source)) if source else None


def file_folders(kind):
    """The folders that hold models of a kind (diffusion_models, text_encoders, vae: single
    files; diffusers: model folders)."""
    folder_paths = _comfy("folder_paths")
    if folder_paths:
        return folder_paths.get_folder_paths(kind)
    root = os.environ.get("LORALAB_MODELS") or os.path.abspath("models")
    return [os.path.join(root, name) for name in FILE_FOLDERS[kind]]


def file_choices(kind):
    """NO_MODEL and the .safetensors files of a kind, as names relative to their folder (what
    ComfyUI's own loader nodes list)."""
    folder_paths = _comfy("folder_paths")
    if folder_paths:
        names = folder_paths.get_filename_list(kind)
    else:
        names = [os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/")
                 for base in file_folders(kind) for root, _, files in os.walk(base) for name in files]
    return [NO_MODEL] + sorted({name for name in names if name.endswith(".safetensors")})


def file_choice_path(kind, choice):
    """The full path of a file_choices() entry, or None for anything else: a path given as is,
    `..` or a name outside the kind's folders gets the same None as a missing file, so the
    answer never tells whether a file exists outside them."""
    if not isinstance(choice, str) or choice == NO_MODEL or choice not in file_choices(kind):
        return None
    for base in file_folders(kind):
        if os.path.isfile(os.path.join(base, choice)):
            return os.path.join(base, choice)
    return None


# -- progress and interrupt ---------------------------------------------------------------------

class ProgressBar:
    """ComfyUI's progress bar on the node, with an optional preview image (PIL)."""

    def __init__(self, total):
        utils = _comfy("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils else None
        self.value, self.total = 0, total

    def update(self, value, total=None, preview=None):
        self.value, self.total = value, total or self.total
        if self.bar is not None:
            shown = ("JPEG", preview, _preview_size()) if preview is not None else None
            self.bar.update_absolute(value, self.total, shown)


def _preview_size():
    cli_args = _comfy("comfy.cli_args")
    return getattr(getattr(cli_args, "args", None), "preview_size", None) or PREVIEW_SIZE


def interrupted():
    """Whether the user pressed Cancel in ComfyUI (never true outside it)."""
    management = _comfy("comfy.model_management")
    return bool(management and management.processing_interrupted())


def raise_if_interrupted():
    """Ends the node the way ComfyUI ends an interrupted one. Outside ComfyUI a stop request
    (Ctrl+C) stays set, and the workflow runner stops before the next node."""
    management = _comfy("comfy.model_management")
    if management:
        management.throw_exception_if_processing_interrupted()


@contextlib.contextmanager
def outside_inference_mode():
    """ComfyUI runs every node under torch.inference_mode(). LoRA Lab's pipeline outlives a node
    and is trained on, and inference tensors cannot be saved for backward: so whatever loads,
    moves (a move copies the weights) or trains it leaves inference mode, with autograd on.
    Headless this changes nothing."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        yield


def torch_device():
    """ComfyUI's compute device, else CUDA when present, else the CPU."""
    import torch

    management = _comfy("comfy.model_management")
    if management:
        return management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_comfyui_models():
    """Before LoRA Lab puts a base model on the accelerator: ComfyUI's model management unloads
    every model it holds there (ComfyUI's own trainer asks the same, through load_models_gpu with
    all memory required), so the two never share the card; it empties the allocator's cache when
    it unloaded something. Headless there is nothing to free."""
    management = _comfy("comfy.model_management")
    if management:
        management.unload_all_models()


def free_device_memory(pipeline):
    """Inside ComfyUI, moves a LoRA Lab pipeline to the CPU so ComfyUI's own models get the GPU
    back. Headless nothing else needs it, so it stays where it is for the next node."""
    management = _comfy("comfy.model_management")
    if management:
        pipeline.to("cpu")
        management.soft_empty_cache()


def forget_pipeline():
    """After the last reference to a pipeline is dropped: its memory goes back now (a pipeline's
    modules can hold reference cycles, which only the collector frees), and the accelerator's
    cached blocks with it."""
    import gc

    import torch

    gc.collect()
    _give_back_freed_ram()
    management = _comfy("comfy.model_management")
    if management:
        management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def _give_back_freed_ram():
    """glibc keeps freed blocks below its mmap threshold (a model's many small weights) in the
    thread's arena; a model loaded next from a memory-mapped file (ComfyUI's) cannot reuse them, so
    they go back to the system (malloc_trim; other C libraries: nothing to do)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- ComfyUI models -----------------------------------------------------------------------------

def patch_model_with_lora(model, lora_tensors, strength, clip=None):
    """(MODEL, CLIP): clones of a ComfyUI MODEL and, when given, CLIP with the LoRA patched in,
    through ComfyUI's own LoRA loading (the path LoraLoader takes; LoraLoaderModelOnly's without
    a CLIP, which is then returned as None), both at `strength`."""
    sd = _comfy("comfy.sd")
    if sd is None:
        raise RuntimeError("LoRALabApplyLoRA patches a ComfyUI MODEL, so it runs only inside "
                           "ComfyUI. Headless, use LoRALabSampleGrid to see the LoRA.")
    return sd.load_lora_for_models(model, clip, lora_tensors, strength, strength if clip is not None else 0)
