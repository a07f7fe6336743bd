"""Shared fixtures, built once per session: a tiny random FLUX.1 folder, tiny SD1.5/SDXL models,
drawn datasets and a real ComfyUI server. (A fixture imported into several test modules is set up
once per module, so the ones several modules use live here.)"""
import copy
import json
import os
import shutil
import subprocess
import sys
import time

# One thread for torch, here and in every process a test starts (loralab, torchrun, ComfyUI), set
# before anything imports torch: tiny models gain nothing from a second thread, and on a shared
# 2-core machine two threads mostly wait for each other (a 6-step quickstart run: 27 s of CPU on
# one thread, 227 s on two). A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Runs on builtin:demo score the demo from 2 seeds (12 pictures), not a user's 8 (48): the tests
# that judge the demo's verdict (test_demo_concept.py) ask for 8 themselves.
os.environ.setdefault("LORALAB_DEMO_SEEDS", "2")

import pytest  # noqa: E402

import loralab  # noqa: E402
from comfyui_env import Server, comfyui_or_skip, comfyui_source, skip  # noqa: E402
from loralab.core.config import resolve  # noqa: E402
from loralab.core.demo.dataset import make_demo_dataset  # noqa: E402
from loralab.core.families.flux.tiny import build_tiny_flux  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Node inputs name folders inside ComfyUI's folders (headless: $LORALAB_INPUT, $LORALAB_MODELS):
# the session's demo dataset and tiny model are built there, and the nodes get their names.
INPUT, MODELS = "input", "models"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux(str(tmp_path_factory.getbasetemp() / MODELS / "diffusers" / "tiny-flux"))


# ComfyUI's source (read-only): its tokenizers are what single-file FLUX.1 models use.
COMFYUI_SOURCE = os.path.abspath(os.environ.get("LORALAB_COMFYUI") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "comfyui"))


@pytest.fixture(scope="session")
def comfyui_folder(tiny_flux, tmp_path_factory):
    """A ComfyUI-like folder: models/ holds the tiny model as ComfyUI's single files
    (diffusion_models/tiny-flux.safetensors and -fp8, text_encoders/clip_l and t5xxl,
    vae/ae.safetensors) and comfy/ is ComfyUI's source (its tokenizers)."""
    from loralab.core.families.flux.tiny import write_comfyui_files

    if not os.path.isdir(os.path.join(COMFYUI_SOURCE, "comfy", "sd1_tokenizer")):
        pytest.skip(f"no ComfyUI source at {COMFYUI_SOURCE} (set LORALAB_COMFYUI): its tokenizers "
                    "are needed to load single-file models")
    write_comfyui_files(tiny_flux)
    folder = tmp_path_factory.mktemp("comfyui") / "ComfyUI"
    folder.mkdir()
    os.symlink(os.path.join(tiny_flux, "comfyui"), folder / "models")
    os.symlink(os.path.join(os.path.abspath(COMFYUI_SOURCE), "comfy"), folder / "comfy")
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """{family: (folder, single file, v-prediction single file)} for sd15 and sdxl."""
    from loralab.core.families.unet import tiny

    if not os.path.isdir(os.path.join(COMFYUI_SOURCE, "comfy", "sd1_tokenizer")):
        pytest.skip(f"no ComfyUI source at {COMFYUI_SOURCE}: its CLIP tokenizer loads single files")
    base = tmp_path_factory.mktemp("sd")
    made = {}
    for family in ("sd15", "sdxl"):
        folder = tiny.build_tiny(family, str(base / family), comfyui=COMFYUI_SOURCE)
        made[family] = (folder, tiny.write_single_file(folder, str(base / "checkpoints" / f"{family}.safetensors")),
                        tiny.write_single_file(folder, str(base / "checkpoints" / f"{family}-v.safetensors"),
                                               v_prediction=True))
    return made


@pytest.fixture(scope="session")
def sd_models(tmp_path_factory):
    """{family: tiny diffusers folder} for sd15 and sdxl, built without ComfyUI's tokenizers."""
    from loralab.core.families.unet.tiny import build_tiny

    root = tmp_path_factory.mktemp("sd-models")
    return {family: build_tiny(family, str(root / family)) for family in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Three drawn demo images (the SD learning tests)."""
    return make_demo_dataset(str(tmp_path_factory.mktemp("sd-learn") / "data"), count=3)


# Qwen3's chat template, reduced to one user message (the real one adds no system message)
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_tokenizer():
    """The real Qwen tokenizer from ComfyUI's source (its qwen25_tokenizer: Qwen3's vocabulary
    too) with Qwen3's chat template: the tiny Z-Image's and FLUX.2 klein's (test_zimage.py,
    test_flux2.py)."""
    from transformers import Qwen2Tokenizer

    files = os.path.join(comfyui_source(), "comfy", "text_encoders", "qwen25_tokenizer")
    if not os.path.isfile(os.path.join(files, "vocab.json")):
        skip(f"the Qwen tokenizer comes from ComfyUI's source; not found at {files}")
    tokenizer = Qwen2Tokenizer.from_pretrained(files)
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def tiny_qwen3(model_class, **sizes):
    """A random Qwen3 text encoder (transformers' `model_class`: Qwen3Model or Qwen3ForCausalLM)
    of the real vocabulary, 2 attention heads and 1 key-value head, at the given sizes."""
    from transformers import Qwen3Config

    return model_class(Qwen3Config(vocab_size=151936, num_attention_heads=2, num_key_value_heads=1, **sizes))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real ComfyUI server with the pack in custom_nodes, one for the session (its start takes
    a minute): test_comfyui_server.py and test_sd_workflows.py post to it."""
    folder, python = comfyui_or_skip()
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    # the pack as a user installs it: its folder in custom_nodes, under a hyphenated name
    os.symlink(os.path.dirname(os.path.abspath(loralab.__file__)), base / "custom_nodes" / "comfyui-loralab")
    started = time.monotonic()
    # builtin:tiny-flux and builtin:demo are built where the other tests build them
    cache = tmp_path_factory.getbasetemp() / "loralab-cache"
    server = Server(folder, python, base, base / "comfyui.log", cache)
    try:
        server.wait_started()
        print(f"\nComfyUI started in {time.monotonic() - started:.1f} s")
        server.base = base
        yield server
    finally:
        server.stop()
        shutil.copy(base / "comfyui.log", tmp_path_factory.getbasetemp() / "comfyui-server.log")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run in milliseconds on one thread; several threads on shared cores wait for
    each other (a tiny UNet call: 0.03 s on one thread, seconds on two when the cores are busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.getbasetemp() / INPUT / "demo"), count=6)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    # builtin:tiny-flux and builtin:demo are built into a test-session folder, never into ~/.cache
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path_factory.getbasetemp() / "loralab-cache"))


@pytest.fixture(scope="session", autouse=True)
def node_folders(tmp_path_factory):
    """Nodes called in this process find demo_dataset as "demo" and tiny_flux as "tiny-flux"
    (session-wide, so module fixtures that call nodes see it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_INPUT", str(tmp_path_factory.getbasetemp() / INPUT))
        patch.setenv("LORALAB_MODELS", str(tmp_path_factory.getbasetemp() / MODELS))
        yield


# -- pytest-xdist (pyproject: -n auto --dist loadgroup): each worker is a session of its own -------

# Tests that run for minutes (matched in their ids): under xdist their groups start first, so that
# neither worker is left running one of them alone at the end.
LONGEST = ("test_demo_concept.py::test_the_shipped_quickstart", "test_kill_anywhere.py::")


def _group(item):
    """The xdist group of a test that shares a costly fixture, else None: every test of the real
    ComfyUI server (a minute to start) in one group; a module's tests that share a fixture of the
    module's own (scope "module") in the module's group."""
    module = item.nodeid.split("::")[0]
    if "server" in item.fixturenames:
        return "comfyui-server"
    if any(defs[-1].scope == "module" and defs[-1].baseid == module
           for defs in item._fixtureinfo.name2fixturedefs.values()):
        return module
    return None


def pytest_collection_modifyitems(items):
    """Under xdist, a grouped test's id ends in "@group", the form that xdist's loadgroup reads
    (set here: xdist 3.8's xdist_group mark sets item._nodeid, which pytest 9 no longer reads).
    The queue (--no-loadscope-reorder: in collection order) holds the longest groups first, then
    the other groups, then single tests, so that the last units handed out are short."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    groups = {item.nodeid: _group(item) for item in items}
    longest = {groups[item.nodeid] or item.nodeid for item in items if any(key in item.nodeid for key in LONGEST)}
    items.sort(key=lambda item: 0 if (groups[item.nodeid] or item.nodeid) in longest else 1 if groups[item.nodeid] else 2)
    for item in items:
        if groups[item.nodeid] and "@" not in item.nodeid:
            _set_id(item, f"{item.nodeid}@{groups[item.nodeid]}")


def _set_id(item, nodeid):
    try:  # pytest 9 keeps a node's id in _id; pytest 8 in _nodeid (where xdist sets it)
        from _pytest.nodeid import coerce_node_id
    except ImportError:
        item._nodeid = nodeid
    else:
        item._id = coerce_node_id(nodeid)


FAST = {
    "model": {"dtype": "fp32"},
    "dataset": {"trigger_word": "sks", "resolution": [64]},
    "train": {"dtype": "fp32", "gradient_checkpointing": False, "optimizer": "adamw", "lr": 1e-3},
    "sample": {"sample_every": 0, "width": 64, "height": 64, "sample_steps": 2},
    "logging": {"performance_log_every": 5},
}


def merge(base, extra):
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict):
            merged[key] = merge(merged.get(key, {}), value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def make_config(tiny_flux, demo_dataset, tmp_path):
    """A raw config for the tiny model and demo data, fast settings, plus overrides."""
    def build(**sections):
        raw = merge(FAST, {"name": "test_lora", "model": {"path": tiny_flux},
                           "dataset": {"folder": demo_dataset},
                           "save": {"output_dir": str(tmp_path / "output")}})
        return merge(raw, sections)
    return build


@pytest.fixture
def resolved(make_config):
    return lambda **sections: resolve(make_config(**sections))


def torchrun(*args, processes=2, timeout=300):
    """torchrun ARGS with `processes` CPU processes on a port of its own choosing (--standalone):
    two tests running at once (pytest-xdist's workers) never race for a fixed port."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(processes), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def train_in_processes(raw, folder, processes=2):
    """`loralab train` of the raw config `raw` (written to `folder`) under torchrun with
    `processes` CPU processes: accelerate's DDP."""
    path = folder / f"{raw['name']}.json"
    path.write_text(json.dumps(raw))
    return torchrun("-m", "loralab.cli", "train", path, processes=processes)


def run_cli(*args, timeout=300, **kwargs):
    """`loralab ...` as a real subprocess. Unless given an env, it runs without LORALAB_COMFYUI:
    that names a ComfyUI for the integration tests, and would make `loralab run` run its nodes;
    nor the in-process tests' LORALAB_INPUT and LORALAB_MODELS (its input folder: ./input)."""
    command = [sys.executable, "-m", "loralab.cli", *args]
    kwargs.setdefault("env", {k: v for k, v in os.environ.items()
                              if k not in ("LORALAB_COMFYUI", "LORALAB_INPUT", "LORALAB_MODELS")})
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_cli(config, folder, timeout=600, **kwargs):
    """`loralab train` of `config` written to folder/config.json, which must finish: (the
    completed process, the LoRA file its last line names)."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    result = run_cli("train", os.path.join(folder, "config.json"), timeout=timeout, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, json.loads(result.stdout.strip().splitlines()[-1])["lora"]

