"""Where the real-ComfyUI tests find ComfyUI, and what they do when it is not there.

LORALAB_COMFYUI names a ComfyUI folder (its source: main.py, comfy/) and LORALAB_COMFYUI_PYTHON
a Python that runs it with the pack's requirements. Without them these tests skip, saying what
to set. With LORALAB_REQUIRE_COMFYUI=1 (CI sets it when ComfyUI is available) such a skip is a
failure instead, so the real-ComfyUI tests cannot quietly stop running."""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

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


# The start of every check script the tests run in ComfyUI's Python (the scripts name it first):
# the job (a JSON file, the last argument), ComfyUI's own argument parsing on the CPU, the
# modules that load and map LoRAs, and every warning ComfyUI logs caught in `warnings`.
COMFYUI_HEAD = r'''
import json, logging, sys
job = json.load(open(sys.argv[-1]))
sys.argv = ["check", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.lora_convert, comfy.model_detection, comfy.sd, comfy.sd1_clip, comfy.sdxl_clip
import comfy.supported_models, comfy.utils
from safetensors.torch import load_file, save_file

warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Catch()); logging.getLogger().setLevel(logging.WARNING)
'''


# -- a ComfyUI server (conftest.py's `server`, one per session) ------------------------------------

STARTED = "To see the GUI go to"
START_TIMEOUT, RUN_TIMEOUT = 180, 1200  # seconds; a busy CPU trains slowly


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A ComfyUI server process and the few endpoints the check uses."""

    def __init__(self, folder, python, base, log_path, cache):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        command = [python, "main.py", "--cpu", "--listen", "127.0.0.1",
                   "--port", self.url.rsplit(":", 1)[1], "--base-directory", str(base),
                   "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
                   "--disable-auto-launch"]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=folder, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            # one thread: tiny models on this shared 2-core
                                            # runner ran ~2.5x faster than on two
                                            env={**os.environ, "LORALAB_CACHE": str(cache),
                                                 "OMP_NUM_THREADS": "1"})

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def wait_started(self):
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ComfyUI did not start:\n" + self.log()[-4000:])
            time.sleep(1)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as reply:
            return reply.read()

    def get_json(self, path):
        return json.loads(self.get(path))

    def run_prompt(self, prompt):
        """POST /prompt, then poll /history until the prompt is done; its history entry."""
        body = json.dumps({"prompt": prompt, "client_id": "loralab-test"}).encode()
        request = urllib.request.Request(self.url + "/prompt", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                prompt_id = json.load(reply)["prompt_id"]
        except urllib.error.HTTPError as refused:
            pytest.fail(f"/prompt refused the workflow: {refused.read().decode()[:4000]}")
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if self.process.poll() is not None:
                pytest.fail("ComfyUI exited while running the prompt:\n" + self.log()[-4000:])
            time.sleep(2)
        pytest.fail(f"the prompt did not finish in {RUN_TIMEOUT} s:\n" + self.log()[-4000:])

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
