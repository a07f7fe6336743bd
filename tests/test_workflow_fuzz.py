"""Malformed variants of every shipped workflow (API and UI format), made by random mutation
with a fixed seed: the loader and validator answer each with a WorkflowError whose lines name a
node (or say the file is no workflow), never another exception, and never hang; a handful go
through the real `loralab run`, which exits 2 without a traceback."""
import copy
import json
import os
import random
import signal
import time

import pytest

import loralab
from loralab.workflow_runner import WorkflowError, validate

from conftest import run_cli

NODES = loralab.NODE_CLASS_MAPPINGS
WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
FILES = sorted(name for name in os.listdir(WORKFLOWS) if name.endswith(".json"))
VARIANTS_PER_FILE = 60
LONG = "a" * 3000
# Values of the wrong type, shape or size for any place in a workflow.
JUNK = [None, True, False, 0, -1, 7, 3.5, 1e308, float("nan"), float("inf"), "", "x", LONG,
        "a\x00b", "a\nb", "\ud800", [], [1], ["1"], ["1", 0], ["1", 99], ["999", 0], ["1", -1],
        ["1", "0"], [None, 0], [True, 0], [1, 2, 3], [[1, 2]], {}, {"a": 1}, {"class_type": 5},
        {"id": 1}, [0, 1, 0, 2, 0, "X"], 2 ** 70]
FILE_SYSTEM_VALUES = {"filename_prefix": ["loralab/" + LONG, "a\x00b", "a/" * 2100 + "b", 5],
                      "name": [LONG, "run\x01", "b" * 230, None],
                      "folder": [LONG, "/tmp/\x00", "/" + "d/" * 2100, []],
                      "path": [LONG, "x\x07", "/" + "p/" * 2100, 3]}


def read(name):
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as handle:
        return json.load(handle)


def places(value, path=()):
    """Every (container, key) in a JSON tree."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, child in items:
        found.append((value, key))
        found.extend(places(child, path + (key,)))
    return found


def mutate_anywhere(workflow, rng):
    """Drop, retype or replace one value somewhere in the tree (any level)."""
    container, key = rng.choice(places(workflow))
    action = rng.choice(["drop", "junk", "junk", "retype"])
    if action == "drop":
        del container[key]
        return f"dropped {key!r}"
    if action == "junk":
        container[key] = copy.deepcopy(rng.choice(JUNK))
        return f"{key!r} -> {container[key]!r:.40}"
    old = container[key]
    container[key] = (str(old) if not isinstance(old, str) else
                      int(old) if old.isdigit() else [old])
    return f"{key!r} retyped"


def mutate_api(workflow, rng):
    ids = list(workflow)
    node_id = rng.choice(ids)
    node = workflow[node_id]
    links = [(name, value) for name, value in node.get("inputs", {}).items()
             if isinstance(value, list)]
    kind = rng.choice(["dangling", "self", "slot", "cycle", "inputs", "node", "class"])
    if kind == "dangling" and links:
        node["inputs"][rng.choice(links)[0]] = ["12345", 0]
    elif kind == "self" and links:
        node["inputs"][rng.choice(links)[0]] = [node_id, 0]
    elif kind == "slot" and links:
        node["inputs"][rng.choice(links)[0]][1] = rng.choice([7, -3, 100000])
    elif kind == "cycle" and links:  # the source now needs this node
        source = workflow[str(rng.choice(links)[1][0])]
        source.setdefault("inputs", {})["loop"] = [node_id, 0]
        first = next(iter(declared(source["class_type"])), None)
        if first:
            source["inputs"][first] = [node_id, 0]
    elif kind == "inputs":
        node["inputs"] = rng.choice([5, "x", [1, 2], None, [["1", 0]]])
    elif kind == "node":
        workflow[node_id] = rng.choice([5, "x", [], None, {"inputs": {}}])
    else:
        node["class_type"] = rng.choice([5, None, "", ["a"], "NoSuchNode"])
    return f"api {kind} at node {node_id}"


def declared(class_type):
    node_class = NODES.get(class_type)
    return list((node_class.INPUT_TYPES().get("required") or {})) if node_class else []


def mutate_ui(workflow, rng):
    nodes, links = workflow["nodes"], workflow.get("links") or []
    kind = rng.choice(["links", "link", "origin", "self", "slot", "entry", "widgets", "wlen",
                       "socket", "id", "mode"])
    node = rng.choice(nodes)
    if kind == "links":
        workflow["links"] = rng.choice([3.5, "x", {"a": 1}, 7])
    elif kind == "link" and links:
        links[rng.randrange(len(links))] = rng.choice([5, "x", [1, 2, 3], {"id": None}, None])
    elif kind == "origin" and links:
        rng.choice(links)[1] = rng.choice([9999, None, "zz", 2.5])
    elif kind == "self" and links:
        link = rng.choice(links)
        link[1] = link[3]
    elif kind == "slot" and links:
        rng.choice(links)[2] = rng.choice([9, -1, "0", None, 1.5])
    elif kind == "entry":
        nodes[rng.randrange(len(nodes))] = rng.choice(["x", 5, None, [], {"id": []}])
    elif kind == "widgets":
        node["widgets_values"] = rng.choice([5, "x", True, 1.5])
    elif kind == "wlen" and isinstance(node.get("widgets_values"), list):
        values = node["widgets_values"]
        node["widgets_values"] = values[:rng.randrange(len(values))] if values and rng.random() < .5 \
            else values + ["extra"] * rng.randint(1, 4)
    elif kind == "socket" and node.get("inputs"):
        sockets = node["inputs"]
        sockets[rng.randrange(len(sockets))] = rng.choice(["x", 5, {"name": 5}, {"name": "a", "link": [1]}])
    elif kind == "id":
        node["id"] = rng.choice([None, [1], {"a": 1}, nodes[0]["id"], 1.5])
    else:
        node["mode"] = rng.choice(["x", None, [2], 2, 4, 1.5])
    return f"ui {kind}"


def set_file_system_value(workflow, rng, is_ui):
    """Put a value too long, odd or of the wrong type into an input that reaches the disk."""
    if is_ui:
        return None  # widget positions differ per node; the API variants cover the values
    targets = [(node, name) for node in workflow.values()
               for name in node.get("inputs", {}) if name in FILE_SYSTEM_VALUES]
    if not targets:
        return None
    node, name = rng.choice(targets)
    node["inputs"][name] = rng.choice(FILE_SYSTEM_VALUES[name])
    return f"file-system value {name}"


def wrap(workflow, rng):
    kind = rng.randrange(5)
    if kind == 0:
        return {"prompt": workflow, "extra_data": {}}, "wrapped /prompt"
    if kind == 1:
        return {"prompt": [3, "abc", workflow, {}, ["9"]], "outputs": {}}, "wrapped history entry"
    if kind == 2:
        return {"abc": {"prompt": [3, "abc", workflow, {}, []], "outputs": {}}}, "wrapped history"
    return {"prompt": rng.choice([5, "x", [1, 2], None])}, "wrapped junk"


def variants(name, count, seed):
    rng = random.Random(f"{seed}-{name}")
    original = read(name)
    is_ui = "nodes" in original
    for _ in range(count):
        workflow = copy.deepcopy(original)
        roll = rng.random()
        if roll < 0.35:
            what = mutate_anywhere(workflow, rng)
        elif roll < 0.65:
            what = (mutate_ui if is_ui else mutate_api)(workflow, rng)
        elif roll < 0.75:
            what = set_file_system_value(workflow, rng, is_ui) or mutate_anywhere(workflow, rng)
        elif roll < 0.85:
            workflow, what = wrap(workflow, rng)
        else:
            text = json.dumps(workflow)
            cut = rng.randrange(len(text))
            yield f"{name}: torn at {cut}", text[:cut]
            continue
        if rng.random() < 0.3:  # a second mutation on top, now and then
            try:
                what += "; " + mutate_anywhere(workflow, rng)
            except IndexError:
                pass
        yield f"{name}: {what}", workflow


def says_where(line):
    return "node" in line or "workflow" in line or "JSON" in line


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def test_malformed_workflows_give_one_line_errors_never_a_traceback(tmp_path):
    started, count, outcomes = time.monotonic(), 0, {"refused": 0, "accepted": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name in FILES:
            for index, (what, workflow) in enumerate(variants(name, VARIANTS_PER_FILE, 13)):
                if isinstance(workflow, str):  # a torn file
                    path = tmp_path / f"{index}-{name}"
                    path.write_text(workflow, encoding="utf-8")
                    workflow = str(path)
                signal.alarm(10)
                try:
                    validate(workflow, NODES)
                    outcomes["accepted"] += 1
                except WorkflowError as error:
                    outcomes["refused"] += 1
                    lines = str(error).splitlines()
                    assert lines, what
                    for line in lines:
                        assert says_where(line), f"{what}: {line!r} names no node"
                except Hang:
                    pytest.fail(f"{what}: validation hung")
                except Exception as error:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"{what}: raised {type(error).__name__}: {error}")
                finally:
                    signal.alarm(0)
                count += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert count == len(FILES) * VARIANTS_PER_FILE
    assert outcomes["refused"] > count * 0.8, outcomes
    assert time.monotonic() - started < 30


def _write(tmp_path, name, workflow):
    path = tmp_path / name
    path.write_text(workflow if isinstance(workflow, str) else json.dumps(workflow),
                    encoding="utf-8")
    return str(path)


def _quickstart_variants():
    api, ui = read("quickstart.json"), read("quickstart.ui.json")
    inputs_int = copy.deepcopy(api)
    inputs_int["3"]["inputs"] = 5
    links_float = copy.deepcopy(ui)
    links_float["links"] = 3.5
    link_int = copy.deepcopy(ui)
    link_int["links"][0] = 5
    entry_str = copy.deepcopy(ui)
    entry_str["nodes"][1] = "node"
    long_prefix = copy.deepcopy(api)
    save = next(node for node in long_prefix.values()
                if node["class_type"] == "LoRALabSaveCheckpoint")
    save["inputs"]["filename_prefix"] = "loralab/" + LONG
    return {"torn.json": json.dumps(api)[:200], "inputs-int.json": inputs_int,
            "links-float.json": links_float, "link-int.json": link_int,
            "entry-str.json": entry_str, "long-prefix.json": long_prefix,
            "wrapped-junk.json": {"prompt": 5}}


@pytest.mark.parametrize("name", sorted(_quickstart_variants()))
def test_loralab_run_refuses_a_malformed_workflow_with_exit_2(tmp_path, name):
    result = run_cli("run", _write(tmp_path, name, _quickstart_variants()[name]), timeout=120,
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ")
    assert all(says_where(line) for line in lines), result.stderr


@pytest.mark.parametrize("class_type, name, value, says", [
    ("LoRALabSaveCheckpoint", "filename_prefix", "loralab/" + LONG, "bytes long"),
    ("LoRALabSaveCheckpoint", "filename_prefix", "a\x00b", "control character"),
    ("LoRALabSaveCheckpoint", "filename_prefix", 5, "expected a string"),
    ("LoRALabTrainLoRA", "name", "n" * 220, "bytes long"),
    ("LoRALabTrainLoRA", "name", "run\x1b", "control character"),
    ("LoRALabLoadDataset", "folder", "/" + "d/" * 2100, "4096"),
    ("LoRALabLoadDataset", "folder", ["a"], "expected a string"),
    ("LoRALabLoadBaseModel", "path", "m" * 300, "bytes long"),
    ("LoRALabLoadBaseModel", "path", "x\x07", "control character"),
])
def test_values_that_reach_the_disk_are_checked_by_validate_inputs(class_type, name, value, says):
    problem = NODES[class_type].VALIDATE_INPUTS(**{name: value})
    assert problem is not True and problem.startswith(f"{name}: ") and says in problem
    assert len(problem) < 300  # one readable line, not the value itself
    assert NODES[class_type].VALIDATE_INPUTS(**{name: "loralab/ok" if name != "name" else "ok"}) \
        is True or name in ("folder", "path")  # a folder must exist too
