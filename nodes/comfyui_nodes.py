"""ComfyUI's own nodes for `loralab run --comfyui DIR`, so a workflow that mixes them with LoRA
Lab's runs whole headless. ComfyUI is imported the way its main.py starts it (its command-line
options, model folders, built-in extra nodes), without the server, API nodes or custom node
packs, and each node class is wrapped into what the workflow runner calls: a V1 class whose
FUNCTION returns a tuple or {"ui", "result"}."""
import asyncio
import contextlib
import itertools
import logging
import os
import sys

from ..core import UserError
from . import comfy_adapter


class ComfyUINotImportable(UserError):
    pass


def load_comfyui_nodes(folder, comfy_args=()):
    """{class_type: runner node class} of the ComfyUI installation in `folder`.

    comfy_args are ComfyUI's own options (--base-directory, --output-directory,
    --extra-model-paths-config, ...); --cpu is added when there is no CUDA device. Raises
    ComfyUINotImportable, with this process's sys.path and modules as before, when it fails.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    if not (os.path.isfile(os.path.join(folder, "nodes.py"))
            and os.path.isdir(os.path.join(folder, "comfy"))):
        raise ComfyUINotImportable(
            f"{folder} is not a ComfyUI folder: it has no nodes.py and comfy/.")
    # First on the path, as when ComfyUI runs its main.py: its top-level `nodes`, `utils`,
    # `app` must win over same-named modules elsewhere.
    sys.path.insert(0, folder)
    try:
        mappings = _import_comfyui(folder, list(comfy_args))
    except SystemExit:  # argparse has printed what is wrong with the options
        _forget(folder)
        raise ComfyUINotImportable(
            f"ComfyUI did not accept the options {' '.join(comfy_args)!r}.") from None
    except Exception as error:
        _forget(folder)
        raise ComfyUINotImportable(
            f"ComfyUI in {folder} could not be imported by {sys.executable} "
            f"({type(error).__name__}: {error}). Run loralab with ComfyUI's Python, with LoRA "
            "Lab installed in it (pip install -e <this repository> --no-deps).") from error
    comfy_adapter.forget_imports()  # it may have cached "no ComfyUI" before
    return {name: runner_node(node_class) for name, node_class in mappings.items()}


def _forget(folder):
    """Undo a failed import: ComfyUI's half-imported modules must not make the nodes believe
    they run inside ComfyUI. What it imported from elsewhere (torch) stays."""
    sys.path.remove(folder)
    inside = folder + os.sep
    for name, module in list(sys.modules.items()):
        if any(str(path).startswith(inside) for path in _locations(module)):
            del sys.modules[name]


def _locations(module):
    """A module's file, and a package's folders (a namespace package has only those)."""
    try:
        return [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or [])]
    except TypeError:  # a module whose __path__ is no list (torch._classes)
        return [getattr(module, "__file__", None)]


def _import_comfyui(folder, comfy_args):
    import torch

    if not torch.cuda.is_available() and "--cpu" not in comfy_args:
        comfy_args.append("--cpu")
    import comfy.options

    # comfy.cli_args parses sys.argv when imported, and every ComfyUI module reads it from there
    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["main.py", *comfy_args]
    try:
        from comfy.cli_args import args
    finally:
        sys.argv = argv
    import folder_paths  # reads --base-directory and --models-directory itself
    import utils.extra_config

    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
    extra_configs = [os.path.join(folder, "extra_model_paths.yaml"),
                     *itertools.chain(*(args.extra_model_paths_config or []))]
    for config in extra_configs:
        if os.path.isfile(config):
            utils.extra_config.load_extra_path_config(config)
    with _quiet_logging():  # import chatter, and extras that need the server are not the user's run
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return dict(nodes.NODE_CLASS_MAPPINGS)


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class _ForwardToComfyClass(type):
    """Class attributes the wrapper lacks (INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE,
    VALIDATE_INPUTS, ...) are the ComfyUI class's own, read when asked for."""

    def __getattr__(cls, name):
        if name == "comfy_class":
            raise AttributeError(name)
        return getattr(cls.comfy_class, name)


class _RunnerNode(metaclass=_ForwardToComfyClass):
    comfy_class = None
    FUNCTION = "run"

    def run(self, **inputs):
        import torch

        with torch.inference_mode():  # as ComfyUI runs every node
            returned = self.call(inputs)
            if asyncio.iscoroutine(returned):
                returned = asyncio.run(returned)
        return _v1_return(returned)

    def call(self, inputs):
        node = self.comfy_class()
        return getattr(node, self.comfy_class.FUNCTION)(**inputs)


class _RunnerV3Node(_RunnerNode):
    """A V3 node (comfy_api io.ComfyNode) runs as ComfyUI's executor runs it: through a class
    clone that holds its hidden inputs, not an instance."""

    def call(self, inputs):
        from comfy_api.internal import make_locked_method_func
        from comfy_api.latest import io

        declared_hidden = self.comfy_class.INPUT_TYPES().get("hidden") or {}
        hidden = {io.Hidden[name]: inputs.pop(name) for name in declared_hidden if name in inputs}
        clone = self.comfy_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
        return make_locked_method_func(self.comfy_class, self.comfy_class.FUNCTION, clone)(**inputs)


def runner_node(node_class):
    base = _RunnerV3Node if hasattr(node_class, "PREPARE_CLASS_CLONE") else _RunnerNode
    return type(node_class.__name__, (base,), {"comfy_class": node_class})


def _v1_return(returned):
    """A V3 NodeOutput as V1's {"ui": ..., "result": (...)}; V1 returns stay as they are."""
    if not hasattr(returned, "args") or not hasattr(returned, "ui"):
        return returned
    ui = returned.ui.as_dict() if hasattr(returned.ui, "as_dict") else returned.ui
    return {"ui": ui, "result": tuple(returned.args)}
