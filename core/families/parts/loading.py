"""Loading a diffusers folder: the check that it is one, quiet loading (what every family's
loader wraps its from_pretrained in), and the frozen pipeline every transformer family hands on."""
import contextlib
import os
import warnings

from ..base import ModelError


def check_model_folder(path, wanted):
    """The folder's absolute path, after checking it is a diffusers folder; `wanted` says which
    folder to give (the family's words)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ModelError(f"model.path: {path} is not a folder. Give {wanted}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"model.path: {path} has no model_index.json, so it is not a diffusers "
                         "folder. Point it at the folder that holds model_index.json.")
    return path


@contextlib.contextmanager
def quiet_loading():
    """No per-file progress bars or renamed-argument notices from diffusers/transformers while
    loading: our own progress output says what is loading."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        import transformers.utils.logging as transformers_logging
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def pipeline_from_folder(pipeline_class, folder, dtype, title, **parts):
    """pipeline_class.from_pretrained of a local diffusers `folder` in `dtype`, `parts` replacing
    its own; a folder it cannot load is one ModelError naming model.path and the family (`title`)."""
    try:
        with quiet_loading():
            return pipeline_class.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **parts)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.path: could not load {title} pipeline from {folder}: {error}") from error


def frozen(pipeline, text_encoder_source):
    """The loaded pipeline with no progress bars and every part frozen in eval mode; how to load
    its text encoder again once freed (`text_encoder_source`) rides along on it."""
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipeline.text_encoder_source = text_encoder_source
    return pipeline
