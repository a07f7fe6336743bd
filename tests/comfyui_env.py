"""Where the real-ComfyUI tests find ComfyUI, and what they do when it is not there.

LORALAB_COMFYUI names a ComfyUI folder (its source: main.py, comfy/) and LORALAB_COMFYUI_PYTHON
a Python that runs it with the pack's requirements. Without them these tests skip, saying what
to set. With LORALAB_REQUIRE_COMFYUI=1 (CI sets it when ComfyUI is available) such a skip is a
failure instead, so the real-ComfyUI tests cannot quietly stop running."""
import os

import pytest

REQUIRE = "LORALAB_REQUIRE_COMFYUI"
# ComfyUI's source beside the checkout, where CI and every developer have it (read-only)
SHARED_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "..", "shared", "comfyui")


def skip(reason):
    """pytest.skip(reason), or pytest.fail(reason) when LORALAB_REQUIRE_COMFYUI is set."""
    if os.environ.get(REQUIRE, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE} is set, but this real-ComfyUI test would skip: {reason}",
                    pytrace=False)
    pytest.skip(reason)


def comfyui_source():
    """ComfyUI's source: LORALAB_COMFYUI, else ../shared/comfyui."""
    return os.environ.get("LORALAB_COMFYUI") or SHARED_SOURCE


def comfyui_python_or_skip():
    """LORALAB_COMFYUI_PYTHON, a Python that imports ComfyUI; skips without it."""
    python = os.environ.get("LORALAB_COMFYUI_PYTHON")
    if not python:
        skip("set LORALAB_COMFYUI_PYTHON to a Python that imports ComfyUI (and LORALAB_COMFYUI "
             "to its folder, if not ../shared/comfyui) to check the pack with ComfyUI's code")
    if not os.access(python, os.X_OK):
        pytest.fail(f"LORALAB_COMFYUI_PYTHON={python} is not an executable")
    return python


def comfyui_or_skip():
    """(LORALAB_COMFYUI, LORALAB_COMFYUI_PYTHON), both set; skips without them."""
    folder = os.environ.get("LORALAB_COMFYUI")
    if not folder or not os.environ.get("LORALAB_COMFYUI_PYTHON"):
        skip("set LORALAB_COMFYUI (a ComfyUI folder) and LORALAB_COMFYUI_PYTHON (its Python) "
             "to check the pack in a real ComfyUI")
    if not os.path.isfile(os.path.join(folder, "main.py")):
        pytest.fail(f"LORALAB_COMFYUI={folder} has no main.py")
    return folder, comfyui_python_or_skip()
