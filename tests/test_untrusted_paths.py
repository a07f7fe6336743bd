"""One rule for every path that reaches the disk (issue 20): a node input or workflow value
resolves only inside the folder it belongs to (ComfyUI's output folder for runs, its model folders
for LoadBaseModel's files), a link is never followed out of a run folder, a folder that holds no
run is never taken over, a config or workflow file is a regular file of bounded size, and a full
disk is one line. Through the node classes, the workflow runner, `loralab` (in process and as a
subprocess) and the real ComfyUI server of the tests."""
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FAST, merge, run_cli
from loralab import cli
from loralab.core.runs import RunFolder, RunLocked
from loralab.nodes import NODE_CLASS_MAPPINGS
from loralab.workflow_runner import WorkflowError, validate

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
SECRET = "registry-token-0123456789"
RUN_CONFIG = {"name": "r", "model": {"path": "/models/FLUX.1-dev"}, "train": {"steps": 4},
              "sample": {"prompts": ["a"]}}


def make_run(folder, config=None):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or {**RUN_CONFIG, "name": os.path.basename(folder)}, f)
    return str(folder)


@pytest.fixture
def secret(tmp_path):
    """A folder outside every allowed one, holding what a hostile workflow wants to read."""
    folder = tmp_path / "home"
    make_run(folder / "victim", {**RUN_CONFIG, "auth": SECRET})
    (folder / "secret.safetensors").write_text(SECRET)
    return folder


# -- CompareRuns: run names only inside the output folder -------------------------------------------

def test_compare_runs_refuses_absolute_paths_and_dotdot_naming_the_input(tmp_path, secret, monkeypatch):
    node = NODE_CLASS_MAPPINGS["LoRALabCompareRuns"]
    monkeypatch.chdir(tmp_path)  # headless, the output folder is ./output
    make_run(tmp_path / "output" / "a")
    victim = str(secret / "victim")
    for inputs, said in [
        ({"runs": f"a\n{victim}", "output_dir": "", "names": ""}, f"runs: {victim!r} is an absolute path"),
        ({"runs": "", "output_dir": "", "names": "a, ../home/victim"}, "names: '../home/victim' leaves the folder"),
        ({"runs": "", "output_dir": str(secret), "names": "a, victim"}, f"output_dir: {str(secret)!r} is an absolute"),
    ]:
        assert node.VALIDATE_INPUTS(**inputs).startswith(said)
        with pytest.raises(ValueError) as refused:
            node().compare(**inputs)
        assert str(refused.value).startswith(said) and SECRET not in str(refused.value)


def test_compare_runs_does_not_follow_a_link_out_of_the_output_folder(tmp_path, secret, monkeypatch):
    node = NODE_CLASS_MAPPINGS["LoRALabCompareRuns"]
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "output" / "a")
    os.symlink(secret / "victim", tmp_path / "output" / "b")  # a run name that is a link leading out
    assert node.VALIDATE_INPUTS(runs="", output_dir="", names="a,b") is True  # the text is fine
    with pytest.raises(ValueError, match="names: 'b' leads out of .* through a link") as refused:
        node().compare(runs="", output_dir="", names="a,b")
    assert SECRET not in str(refused.value)
    (tmp_path / "output" / "b").unlink()
    make_run(tmp_path / "output" / "b")
    os.remove(tmp_path / "output" / "b" / "config.json")  # a run whose config.json links out
    os.symlink(secret / "victim" / "config.json", tmp_path / "output" / "b" / "config.json")
    with pytest.raises(ValueError, match="config.json is a link: it is not followed") as refused:
        node().compare(runs="", output_dir="", names="a,b")
    assert SECRET not in str(refused.value)


def test_runs_compare_on_the_command_line_takes_the_users_own_paths(tmp_path, secret):
    make_run(tmp_path / "output" / "a")
    done = run_cli("runs", "compare", "a", str(secret / "victim"), "--output-dir",
                   str(tmp_path / "output"), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    assert f"auth: a: null; victim: \"{SECRET}\"" in done.stdout  # the user's own file, shown


# -- LoadBaseModel's files: only names listed in their model folders --------------------------------

def quickstart(**model_inputs):
    with open(os.path.join(WORKFLOWS, "quickstart.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    prompt["1"]["inputs"].update(model_inputs)
    return prompt


def test_headless_model_files_resolve_only_inside_the_model_folders(tmp_path, secret, monkeypatch):
    """Headless a workflow's file widgets name files in $LORALAB_MODELS/<kind> (or ./models), as
    ComfyUI's own dropdowns do; a path given as is, or `..`, is refused with one message whether
    or not the file exists."""
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    save_file({"w": np.zeros(1, np.float32)}, str(models / "vae" / "ae.safetensors"))
    monkeypatch.setenv("LORALAB_MODELS", str(models))
    assert validate(quickstart(vae="ae.safetensors"), NODE_CLASS_MAPPINGS)  # a listed name runs

    def refusal(name):
        with pytest.raises(WorkflowError) as refused:
            validate(quickstart(vae=name), NODE_CLASS_MAPPINGS)
        return str(refused.value).replace(repr(name), "NAME")

    outside = str(secret / "secret.safetensors")
    same = refusal(outside)
    assert "vae: NAME is not in ComfyUI's vae folders" in same and SECRET not in same
    assert refusal(outside.replace("secret.", "nothing.")) == same  # no existence oracle
    assert refusal("../../home/secret.safetensors") == refusal("../../home/nothing.safetensors") == same


# -- LoadDataset's folders and LoadBaseModel's path: names inside the input and diffusers folders -----

def hostile_folders(input_dir, secret):
    """Dataset folder names a hostile workflow tries: {name: the name it mirrors, or None}; a
    refusal must read the same for both (no existence oracle)."""
    (input_dir / "out").symlink_to(secret)  # a link inside the input folder leading out
    (input_dir / "gone").symlink_to(secret / "nothing")
    return {"/etc": "/nothing-here", str(secret): str(secret / "nothing"), "../home": "../nothing",
            "out": "gone", "mine/../../home": "mine/../../nothing"}


def dataset_refusal(prompt_of, name, run):
    """The refusal of LoadDataset's folder `name`, with the name itself and the folders blanked."""
    return run(prompt_of(name)).replace(repr(name), "NAME")


def test_headless_dataset_folders_resolve_only_inside_the_input_folder(tmp_path, secret, monkeypatch,
                                                                      demo_dataset):
    """Headless (loralab run --input-dir, $LORALAB_INPUT, else ./input) LoadDataset's folders
    are names inside the input folder, as in ComfyUI: /etc, an absolute path, `..` or a link
    leading out is refused in one line naming the input, the same whether or not it exists."""
    input_dir = tmp_path / "input"
    shutil.copytree(demo_dataset, input_dir / "mine")
    monkeypatch.setenv("LORALAB_INPUT", str(input_dir))
    prompt = quickstart()
    prompt["2"]["inputs"]["folder"] = "mine"
    assert validate(prompt, NODE_CLASS_MAPPINGS)  # a folder inside the input folder runs

    def refused(prompt):
        with pytest.raises(WorkflowError) as error:
            validate(prompt, NODE_CLASS_MAPPINGS)
        assert "\n" not in str(error.value).strip() and SECRET not in str(error.value)
        return str(error.value)

    for widget in ("folder", "regularization_folder"):
        def prompt_of(name):
            changed = quickstart()
            changed["2"]["inputs"].update({"folder": "mine", widget: name})
            return changed
        for name, twin in hostile_folders(input_dir, secret).items():
            said = dataset_refusal(prompt_of, name, refused)
            assert f"(LoRALabLoadDataset), input 'folder, regularization_folder': {widget}: NAME " in said
            assert said == dataset_refusal(prompt_of, twin, refused)  # same, existing or not
        for link in ("out", "gone"):
            os.remove(input_dir / link)
    mirrored = refused(quickstart(path=str(tmp_path)))  # LoadBaseModel's path: the same rule
    assert f"input 'checkpoint, clip_l, diffusion_model, path, t5, text_encoder, vae': path: {str(tmp_path)!r} is " \
           "an absolute path" in mirrored


def test_loralab_run_refuses_a_dataset_outside_its_input_dir_and_trains_one_inside(tmp_path, demo_dataset):
    """`loralab run --input-dir DIR`: the workflow's dataset folder is a name inside DIR. /etc is
    refused before anything runs (no output folder); a folder inside DIR plans and trains."""
    shutil.copytree(demo_dataset, tmp_path / "data" / "mine")
    prompt = quickstart()
    prompt["2"]["inputs"]["folder"] = "/etc"
    (tmp_path / "etc.json").write_text(json.dumps(prompt))
    done = run_cli("run", str(tmp_path / "etc.json"), "--input-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ("error: node 2 'Demo dataset (drawn locally)' (LoRALabLoadDataset), input 'folder, "
                                   "regularization_folder': folder: '/etc' is an absolute path; give "
                                   "a name inside the folder")
    assert not (tmp_path / "output").exists()

    prompt["2"]["inputs"]["folder"] = "mine"
    prompt["3"]["inputs"].update(steps=2, sample_every=0, save_every=2)
    prompt["6"]["inputs"].update(steps=1, strengths="1", prompts="a photo")
    (tmp_path / "mine.json").write_text(json.dumps(prompt))
    done = run_cli("run", str(tmp_path / "mine.json"), "--input-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "output" / "quickstart" / "config.json").read_text())
    assert config["dataset"]["folder"] == str(tmp_path / "data" / "mine")


# -- a folder that holds no run is never taken over; a finished run needs a readable LoRA -------------

@pytest.fixture(scope="module")
def foreign(tiny_flux, demo_dataset, tmp_path_factory):
    """output/r holds a user's own files, then `loralab train` runs a config named r."""
    output = tmp_path_factory.mktemp("takeover") / "output"
    theirs = {"notes.txt": "mine", "loss.png": "my plot", "warnings.json": "[\"mine\"]",
              "metrics.jsonl": "{\"step\": 1, \"loss\": 9}\n", "deep/.tmpABCDEF": "keep",
              ".tmp-0123456789ab-notes.txt": "ours by name only"}
    for name, text in theirs.items():
        os.makedirs(os.path.dirname(output / "r" / name), exist_ok=True)
        (output / "r" / name).write_text(text)
    config = merge(FAST, {"name": "r", "model": {"path": tiny_flux}, "dataset": {"folder": demo_dataset},
                          "train": {"steps": 2}, "save": {"output_dir": str(output), "save_every": 2}})
    path = output.parent / "config.json"
    path.write_text(json.dumps(config))
    first = run_cli("train", str(path), timeout=600)
    return output, theirs, path, first


def test_a_folder_holding_no_run_is_left_as_it_is(foreign):
    output, theirs, _, first = foreign
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"a new run folder {output / 'r-2'}: {output / 'r'} is not a LoRA Lab run folder " \
           "(it holds deep, loss.png, metrics.jsonl, ...): it is left as it is" in first.stderr
    for name, text in theirs.items():
        assert (output / "r" / name).read_text() == text, name
    assert json.loads(first.stdout.splitlines()[-1])["run_folder"] == str(output / "r-2")


def test_a_zero_byte_final_lora_is_trained_again_not_already_finished(foreign):
    output, _, path, _ = foreign
    run = RunFolder(str(output), "r-2")
    open(run.final_lora, "wb").close()
    again = run_cli("train", str(path), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout.splitlines()[-1])
    assert result["status"] == "finished" and result["run_folder"] == run.path
    assert run.has_final_lora() and os.path.getsize(run.final_lora) > 0


# -- links inside a run folder ------------------------------------------------------------------------

def test_a_lock_link_is_refused_and_its_target_never_truncated(tmp_path, secret):
    run = RunFolder(str(tmp_path), "r")
    os.makedirs(run.path)
    os.symlink(secret / "secret.safetensors", run.file(".lock"))
    with pytest.raises(RunLocked, match=r"\.lock is a link: it is not followed"):
        with run.lock():
            pass
    assert (secret / "secret.safetensors").read_text() == SECRET
    assert run.locked_by() is None


def test_runs_export_skips_links_by_name_and_never_copies_their_targets(tmp_path, secret, capsys):
    run = RunFolder(str(tmp_path / "output"), "r")
    make_run(run.path)
    save_file({"w": np.zeros(1, np.float32)}, run.final_lora)
    os.symlink(secret / "secret.safetensors", run.file("loss.png"))
    os.makedirs(run.file("samples", "000000002"))
    os.symlink(secret / "secret.safetensors", run.file("samples", "000000002", "00_s1.png"))
    os.symlink(secret, run.file("samples", "000000004"))
    out = tmp_path / "exported"
    assert cli.main(["runs", "export", run.path, str(out)]) == 0
    said = capsys.readouterr().out
    assert ("not copied (links or not regular files, never followed): loss.png, "
            "samples/000000002/00_s1.png, samples/000000004") in said
    copied = sorted(os.path.relpath(os.path.join(root, name), out)
                    for root, _, names in os.walk(out) for name in names)
    assert copied == ["config.json", "r.safetensors"]


def test_runs_list_and_metrics_never_follow_a_link_out_of_the_run_folder(tmp_path, secret):
    output = tmp_path / "output"
    make_run(output / "ok")
    make_run(output / "linked")
    os.remove(output / "linked" / "config.json")
    os.symlink(secret / "victim" / "config.json", output / "linked" / "config.json")
    (secret / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    os.symlink(secret / "metrics.jsonl", output / "ok" / "metrics.jsonl")
    done = run_cli("runs", "list", "--output-dir", str(output))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"skipped damaged: {output / 'linked' / 'config.json'} is a link: it is not followed" in done.stdout
    assert f"damaged: {output / 'ok' / 'metrics.jsonl'} is a link" in done.stdout
    assert SECRET not in done.stdout
    run = RunFolder(str(output), "ok")
    with pytest.raises(ValueError, match="is a link"):  # nor is a metrics line appended through it
        run.append_metrics({"step": 2, "loss": 0.4})
    assert (secret / "metrics.jsonl").read_text().count("\n") == 1


# -- config and workflow files: regular files of bounded size, any nesting answered in one line -------

def test_a_fifo_a_device_a_huge_or_deep_file_is_refused_before_reading(tmp_path):
    fifo = tmp_path / "workflow.json"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(80 * 2**20)  # sparse: over every cap, costs no disk
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for args, said in [
        (("run", str(fifo)), f"error: {fifo} is not a regular file (a FIFO, device or folder)"),
        (("train", str(fifo)), "the file is not a regular file (a FIFO, device or folder)"),
        (("run", "/dev/zero"), "error: /dev/zero is not a regular file"),
        (("train", "/dev/zero"), "the file is not a regular file"),
        (("run", str(huge)), f"error: {huge} is 83886080 bytes, over the"),
        (("train", str(huge)), "the file is 83886080 bytes, over the 1048576 read at most"),
        (("run", str(deep)), f"error: {deep} nests lists or objects too deeply to be a workflow"),
        (("train", str(deep)), "the file nests lists or objects too deeply to read"),
    ]:
        done = run_cli(*args, timeout=60)  # a FIFO read would wait here for a writer
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


# -- a full disk: one line saying what ran out and where ------------------------------------------------

def full_disk_or_skip():
    """A mount namespace of our own with a tiny tmpfs, which fills like a real full disk."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) for a small full disk")


def in_full_disk(tmp_path, command):
    """Runs `command` (a shell line) with $FULL a 64 KiB tmpfs already filled up."""
    full = tmp_path / "full"
    full.mkdir()
    script = (f"mount -t tmpfs -o size=64k none {full} && (head -c 1M /dev/zero > {full}/filler; true) "
              f"&& export FULL={full} && {command}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_full_disk_is_one_line_naming_the_file_and_folder(tmp_path):
    full_disk_or_skip()
    make_run(tmp_path / "output" / "a")
    make_run(tmp_path / "output" / "b")
    done = in_full_disk(tmp_path, f"{sys.executable} -m loralab.cli runs compare a b --output-dir "
                                  f"{tmp_path / 'output'} --out $FULL/cmp")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the disk of {tmp_path / 'full' / 'cmp'} while writing "
        "loss.png: free space there or choose another output folder (the files written before are intact)")


def test_inside_comfyui_a_full_disk_gets_no_precision_advice(tmp_path):
    full_disk_or_skip()
    code = ("import os, numpy as np\n"
            "from safetensors.numpy import save_file\n"
            "from loralab.core.io import atomic_path\n"
            "from loralab.nodes.errors import one_line_errors, NodeError\n"
            "try:\n"
            "    with one_line_errors('LoRA Lab TrainLoRA'):\n"
            "        with atomic_path(os.environ['FULL'] + '/r/r.safetensors') as t:\n"
            "            save_file({'w': np.zeros(100000, np.float32)}, t)\n"
            "except NodeError as error:\n"
            "    print(error)\n")
    (tmp_path / "node.py").write_text(code)
    done = in_full_disk(tmp_path, f"{sys.executable} {tmp_path / 'node.py'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("LoRA Lab TrainLoRA failed (DiskFull): no space left on the disk")
    assert "fp32" not in done.stdout and "not expected" not in done.stdout


# -- the real ComfyUI server: /prompt refuses what leaves the folders, with one message ---------------

def post(server, prompt):
    """POST /prompt: (HTTP status, reply)."""
    body = json.dumps({"prompt": prompt, "client_id": "loralab-paths"}).encode()
    request = urllib.request.Request(server.url + "/prompt", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_comfyui_refuses_compare_runs_outside_its_output_folder(server):
    victim = str(server.base / "user" / "victim")  # outside ComfyUI's output folder
    if not os.path.exists(victim):
        make_run(victim, {**RUN_CONFIG, "auth": SECRET})
    prompt = {"1": {"class_type": "LoRALabCompareRuns",
                    "inputs": {"runs": f"{victim}\n../user/victim", "output_dir": "", "names": ""}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    status, reply = post(server, prompt)
    assert status == 400 and SECRET not in json.dumps(reply)
    details = {error["details"].split(" - ", 1)[1] for error in reply["node_errors"]["1"]["errors"]}
    assert details == {f"runs: {victim!r} is an absolute path; give a name inside the folder"}


def test_comfyui_refuses_dataset_and_model_folders_outside_its_folders(server, secret, demo_dataset):
    """The real ComfyUI's /prompt: LoadDataset's folders resolve only inside its input folder
    (<base>/input) and LoadBaseModel's path only inside models/diffusers, refused with the one
    line `loralab run` gives, the same whether or not the folder exists."""
    input_dir = server.base / "input"
    if not (input_dir / "mine").exists():
        shutil.copytree(demo_dataset, input_dir / "mine")

    def refused(prompt):
        status, reply = post(server, prompt)
        assert status == 400 and SECRET not in json.dumps(reply), reply
        errors, = reply["node_errors"].values()
        details, = {error["details"].split(" - ", 1)[1] for error in errors["errors"]}  # "<input> - <why>"
        return details

    def prompt_of(name):
        prompt = quickstart()
        prompt["2"]["inputs"]["folder"] = name
        return prompt

    for name, twin in hostile_folders(input_dir, secret).items():
        said = dataset_refusal(prompt_of, name, refused)
        assert said.startswith("folder: NAME ") and said == dataset_refusal(prompt_of, twin, refused)
    assert refused(prompt_of("/etc")) == "folder: '/etc' is an absolute path; give a name inside the folder"
    assert refused(quickstart(path="/etc")) == "path: '/etc' is an absolute path; give a name inside the folder"
    assert refused(quickstart(path="../input/mine")).startswith("path: '../input/mine' leaves the folder")
    prompt = prompt_of("mine")
    prompt["3"]["inputs"].update(steps=1, sample_every=0)
    prompt["6"]["inputs"].update(steps=1, strengths="1", prompts="a photo")
    status, reply = post(server, prompt)
    assert status == 200, reply  # a folder inside the input folder is accepted


def test_comfyui_model_file_dropdowns_refuse_paths_with_one_message(server):
    (server.base / "secret.safetensors").write_text(SECRET)

    def refusal(name):
        status, reply = post(server, quickstart(vae=name))
        assert status == 400, reply
        return json.dumps(reply["node_errors"]["1"]).replace(json.dumps(name)[1:-1], "NAME")

    same = refusal("../../secret.safetensors")
    assert "vae: 'NAME' is not in ComfyUI's vae folders" in same and SECRET not in same
    assert refusal("../../nothing.safetensors") == same
    assert refusal(str(server.base / "secret.safetensors")) == refusal(str(server.base / "nothing.safetensors"))
