"""The workflow runner (workflow_runner/) on small real V1 node classes."""

import json
import signal
import sys

import pytest

from loralab.workflow_runner import (
    NodeFailed, WorkflowError, WorkflowInterrupted, interrupt, load_workflow, run_workflow,
    to_api, validate,
)

CALLS = []  # (class name, kwargs) of every node call, to check what ran and how often


class MakeNumber:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    def make(self, value):
        CALLS.append(("MakeNumber", {"value": value}))
        return (value,)


class AddNumbers:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})},
                "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "add"

    def add(self, a, b, node_id=None):
        CALLS.append(("AddNumbers", {"a": a, "b": b, "node_id": node_id}))
        return (a + b,)


class SeedNumber:
    """A seed widget (saved with a control value after it) and a widget after that."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}),
                             "count": ("INT", {"default": 1, "control_after_generate": True}),
                             "offset": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    def make(self, seed, count, offset):
        CALLS.append(("SeedNumber", {"seed": seed, "count": count, "offset": offset}))
        return (seed * count + offset,)


class Box:
    """Link-only types: NUMBOX carries a number; Double is the node the tests bypass."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("NUMBOX",)
    FUNCTION = "box"

    def box(self, number):
        CALLS.append(("Box", {"number": number}))
        return ({"n": number},)


class Double:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": "x"}), "box": ("NUMBOX",)}}

    RETURN_TYPES = ("NUMBOX",)
    FUNCTION = "double"

    def double(self, label, box):
        CALLS.append(("Double", {"box": box}))
        return ({"n": box["n"] * 2},)


class Unbox:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"box": ("NUMBOX",)}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "unbox"

    def unbox(self, box):
        return (box["n"],)


class WriteText:
    """The output node: writes `prefix + number` to a file and returns the text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"forceInput": True}), "path": ("STRING", {}),
                             "mode": (["plain", "loud"],)},
                "optional": {"prefix": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "write"
    OUTPUT_NODE = True

    def write(self, number, path, mode, prefix=""):
        CALLS.append(("WriteText", {"number": number}))
        text = f"{prefix}{number}" + ("!" if mode == "loud" else "")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return {"ui": {"text": [text]}, "result": (text,)}


class StopAfterMe:
    """Stands in for the trainer: a stop request arrives while it runs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, number):
        interrupt.request_stop()
        return (number,)


class Picky:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"min": 0, "max": 10}), "name": ("STRING", {}),
                             "size": ("COMBO", {"options": ["s", "m"]})}}

    @classmethod
    def VALIDATE_INPUTS(cls, name):
        return True if name.endswith(".txt") else f"name {name!r} must end with .txt"

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, value, name, size):
        return (name,)


class Broken:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self):
        raise RuntimeError("out of coffee")


REGISTRY = {cls.__name__: cls for cls in (
    MakeNumber, AddNumbers, SeedNumber, Box, Double, Unbox, WriteText, StopAfterMe, Picky, Broken)}


@pytest.fixture(autouse=True)
def _fresh_state():
    CALLS.clear()
    interrupt.clear()
    yield
    interrupt.clear()


def api_graph(out_path):
    """2 + 3 written to a file; node 5 feeds nothing and must never run."""
    return {
        "1": {"class_type": "MakeNumber", "inputs": {"value": 2}},
        "2": {"class_type": "MakeNumber", "inputs": {"value": 3}},
        "3": {"class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": ["2", 0]},
              "_meta": {"title": "Sum"}},
        "4": {"class_type": "WriteText",
              "inputs": {"number": ["3", 0], "path": str(out_path), "mode": "plain",
                         "prefix": "n="}},
        "5": {"class_type": "MakeNumber", "inputs": {"value": 7}},
    }


def ui_node(node_id, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "mode": mode, "inputs": list(inputs),
            "outputs": list(outputs), "widgets_values": widgets if widgets is not None else []}
    if title:
        node["title"] = title
    return node


def socket(name, kind, link=None, widget=False):
    entry = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def ui_graph(out_path):
    """The same graph as api_graph, as the editor saves it: AddNumbers' a and b are widgets
    converted to inputs (their slots stay in widgets_values)."""
    return {
        "nodes": [
            ui_node(1, "MakeNumber", [2], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
            ui_node(2, "MakeNumber", [3], outputs=[{"name": "INT", "type": "INT", "links": [2]}]),
            ui_node(3, "AddNumbers", [0, 0], title="Sum",
                    inputs=[socket("a", "INT", 1, widget=True), socket("b", "INT", 2, widget=True)],
                    outputs=[{"name": "INT", "type": "INT", "links": [3]}]),
            ui_node(4, "WriteText", [str(out_path), "plain", "n="],
                    inputs=[socket("number", "INT", 3)]),
            ui_node(5, "MakeNumber", [7]),
            ui_node(6, "Note", ["a comment on the canvas"]),
        ],
        "links": [[1, 1, 0, 3, 0, "INT"], [2, 2, 0, 3, 1, "INT"], [3, 3, 0, 4, 0, "INT"]],
    }


# --- formats ---------------------------------------------------------------------------------

def test_api_and_ui_format_give_the_same_result(tmp_path):
    api = run_workflow(api_graph(tmp_path / "api.txt"), REGISTRY)
    api_calls = list(CALLS)
    CALLS.clear()
    ui = run_workflow(ui_graph(tmp_path / "ui.txt"), REGISTRY)
    assert api.outputs == ui.outputs == {"4": ("n=5",)}
    assert (tmp_path / "api.txt").read_text() == (tmp_path / "ui.txt").read_text() == "n=5"
    assert [c for c in api_calls if c[0] != "WriteText"] == [c for c in CALLS if c[0] != "WriteText"]
    assert ui.ui == {"4": {"text": ["n=5"]}}
    assert to_api(ui_graph(tmp_path / "ui.txt"), REGISTRY).nodes["3"] == {
        "class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": ["2", 0]},
        "_meta": {"title": "Sum"}}


def test_load_workflow_reads_files_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(api_graph(tmp_path / "out.txt")))
    assert run_workflow(good, REGISTRY).outputs == {"4": ("n=5",)}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {"class_type": "MakeNumber",\n  "inputs": {,}}\n}')
    with pytest.raises(WorkflowError) as caught:
        load_workflow(bad)
    assert "bad.json" in str(caught.value) and "line 3" in str(caught.value)


def test_the_body_of_a_prompt_request_is_accepted(tmp_path):
    body = {"prompt": api_graph(tmp_path / "out.txt"), "client_id": "x"}
    assert run_workflow(body, REGISTRY).outputs == {"4": ("n=5",)}


def test_seed_control_values_are_not_inputs(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"][0] = ui_node(1, "SeedNumber", [4, "randomize", 3, "fixed", 10],
                                   outputs=[{"name": "INT", "type": "INT", "links": [1]}])
    result = run_workflow(workflow, REGISTRY)
    assert ("SeedNumber", {"seed": 4, "count": 3, "offset": 10}) in CALLS
    assert result.outputs["4"] == ("n=25",)  # 4 * 3 + 10, plus 3 from node 2


def test_widgets_values_may_be_a_dict_by_name(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"][3]["widgets_values"] = {"path": str(tmp_path / "out.txt"), "mode": "loud",
                                              "prefix": "="}
    assert run_workflow(workflow, REGISTRY).outputs["4"] == ("=5!",)


def test_unlinked_converted_widget_keeps_its_value(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"][2]["widgets_values"] = [0, 40]
    workflow["nodes"][2]["inputs"][1]["link"] = None
    workflow["links"] = [link for link in workflow["links"] if link[0] != 2]
    assert run_workflow(workflow, REGISTRY).outputs["4"] == ("n=42",)


def test_links_may_be_objects_as_newer_frontends_save_them(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link)) for link in workflow["links"]]
    assert run_workflow(workflow, REGISTRY).outputs["4"] == ("n=5",)


# --- muted, bypassed, Reroute, PrimitiveNode -------------------------------------------------

def test_muted_node_that_nothing_needs_is_just_skipped(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"][4]["mode"] = 2
    result = run_workflow(workflow, REGISTRY)
    assert result.outputs["4"] == ("n=5",)
    assert {"node_id": "5", "title": "MakeNumber", "class_type": "MakeNumber",
            "reason": "muted"} in result.skipped


def test_muted_node_that_is_needed_is_an_error_naming_it(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"][1]["mode"] = 2
    workflow["nodes"][1]["title"] = "Three"
    with pytest.raises(WorkflowError) as caught:
        run_workflow(workflow, REGISTRY)
    message = str(caught.value)
    assert "node 3 'Sum'" in message and "'b'" in message
    assert "muted node 2 'Three'" in message
    assert CALLS == []


def box_chain(out_path, double_mode):
    """MakeNumber 6 -> Box -> Double -> Unbox -> WriteText."""
    return {
        "nodes": [
            ui_node(1, "MakeNumber", [6], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
            ui_node(2, "Box", [], inputs=[socket("number", "INT", 1)],
                    outputs=[{"name": "NUMBOX", "type": "NUMBOX", "links": [2]}]),
            ui_node(3, "Double", ["x"], mode=double_mode, inputs=[socket("box", "NUMBOX", 2)],
                    outputs=[{"name": "NUMBOX", "type": "NUMBOX", "links": [3]}]),
            ui_node(4, "Unbox", [], inputs=[socket("box", "NUMBOX", 3)],
                    outputs=[{"name": "INT", "type": "INT", "links": [4]}]),
            ui_node(5, "WriteText", [str(out_path), "plain", ""],
                    inputs=[socket("number", "INT", 4)]),
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "NUMBOX"],
                  [3, 3, 0, 4, 0, "NUMBOX"], [4, 4, 0, 5, 0, "INT"]],
    }


def test_bypassed_node_passes_its_input_of_the_same_type_through(tmp_path):
    assert run_workflow(box_chain(tmp_path / "o.txt", 0), REGISTRY).outputs["5"] == ("12",)
    CALLS.clear()
    result = run_workflow(box_chain(tmp_path / "o.txt", 4), REGISTRY)
    assert result.outputs["5"] == ("6",)
    assert not [c for c in CALLS if c[0] == "Double"]
    assert [s["reason"] for s in result.skipped] == ["bypassed"]


def test_reroute_and_primitive_node_are_resolved(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"] += [
        ui_node(7, "Reroute", [], inputs=[{"name": "", "type": "*", "link": 1}],
                outputs=[{"name": "", "type": "INT", "links": [10]}]),
        ui_node(8, "Reroute", [], inputs=[{"name": "", "type": "*", "link": 10}],
                outputs=[{"name": "", "type": "INT", "links": [11]}]),
        ui_node(9, "PrimitiveNode", [40, "fixed"],
                outputs=[{"name": "INT", "type": "INT", "links": [12], "widget": {"name": "b"}}]),
    ]
    # node 1 -> reroute 7 -> reroute 8 -> Sum.a; primitive 9 (40) -> Sum.b
    workflow["links"] = [[1, 1, 0, 7, 0, "INT"], [10, 7, 0, 8, 0, "INT"],
                         [11, 8, 0, 3, 0, "INT"], [12, 9, 0, 3, 1, "INT"],
                         [3, 3, 0, 4, 0, "INT"]]
    workflow["nodes"][2]["inputs"] = [socket("a", "INT", 11, widget=True),
                                      socket("b", "INT", 12, widget=True)]
    prompt = to_api(workflow, REGISTRY)
    assert prompt.nodes["3"]["inputs"] == {"a": ["1", 0], "b": 40}
    assert set(prompt.nodes) == {"1", "2", "3", "4", "5"}
    assert run_workflow(workflow, REGISTRY).outputs["4"] == ("n=42",)


# --- what runs --------------------------------------------------------------------------------

def test_only_needed_nodes_run_each_once_in_order(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["6"] = {"class_type": "WriteText",  # a second output reusing node 3
                  "inputs": {"number": ["3", 0], "path": str(tmp_path / "b.txt"), "mode": "loud"}}
    events = []
    result = run_workflow(graph, REGISTRY, on_event=events.append)
    assert [c for c in CALLS if c[0] == "MakeNumber"] == [("MakeNumber", {"value": 2}),
                                                          ("MakeNumber", {"value": 3})]
    assert [c[0] for c in CALLS].count("AddNumbers") == 1
    assert "5" not in result.executed and len(result.executed) == 5
    assert result.executed.index("3") < result.executed.index("4")
    assert result.outputs == {"4": ("n=5",), "6": ("5!",)}
    assert ("AddNumbers", {"a": 2, "b": 3, "node_id": "3"}) in CALLS  # hidden UNIQUE_ID
    starts = [e for e in events if e["kind"] == "node_start"]
    done = [e for e in events if e["kind"] == "node_done"]
    assert [e["index"] for e in starts] == [1, 2, 3, 4, 5] and starts[0]["total"] == 5
    assert done[2]["title"] == "Sum" and done[2]["class_type"] == "AddNumbers"
    assert all(e["seconds"] >= 0 for e in done) and result.seconds >= 0


def test_a_node_that_raises_is_named(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["1"] = {"class_type": "Broken", "inputs": {}, "_meta": {"title": "Coffee"}}
    graph["3"]["inputs"]["a"] = ["1", 0]
    with pytest.raises(NodeFailed) as caught:
        run_workflow(graph, REGISTRY)
    assert "node 1 'Coffee' (Broken)" in str(caught.value) and "out of coffee" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)


# --- validation -------------------------------------------------------------------------------

def test_every_validation_problem_is_listed_with_node_title_and_input(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["1"]["inputs"]["value"] = 200                                   # above max
    graph["2"]["inputs"]["value"] = "3"                                   # wrong python type
    graph["3"]["inputs"] = {"a": ["99", 0], "b": ["2", 3]}                # missing node, slot
    graph["4"]["inputs"].update(mode="shouty", path=["1", 0])             # combo, link type
    graph["7"] = {"class_type": "WriteText", "_meta": {"title": "Other"},
                  "inputs": {"number": ["3", 0], "mode": "plain"}}       # missing path
    graph["8"] = {"class_type": "Nonsense", "inputs": {}, "_meta": {"title": "Typo"}}
    graph["10"] = {"class_type": "WriteText", "_meta": {"title": "Needs typo"},
                   "inputs": {"number": ["8", 0], "path": "x.txt", "mode": "plain"}}
    graph["11"] = {"class_type": "Nonsense", "inputs": {}}               # needed by nothing
    graph["9"] = {"class_type": "Picky", "inputs": {"value": -1, "name": "a.png", "size": "xl"}}
    with pytest.raises(WorkflowError) as caught:
        validate(graph, REGISTRY)
    error = caught.value
    assert isinstance(error, ValueError)
    lines = str(error).splitlines()
    assert len(lines) == len(error.problems) == 11

    def line_for(node_id, input_name):
        found = [p for p in error.problems if p["node_id"] == node_id and p["input"] == input_name]
        assert len(found) == 1, (node_id, input_name, str(error))
        index = error.problems.index(found[0])
        assert f"node {node_id} '" in lines[index]
        if input_name:
            assert f"input '{input_name}'" in lines[index]
        return lines[index]

    assert "above the maximum 100" in line_for("1", "value")
    assert "expects INT, got str '3'" in line_for("2", "value")
    assert "node 99, which is not in the workflow" in line_for("3", "a")
    assert "output 3 of node 2 'MakeNumber', which has 1 output(s)" in line_for("3", "b")
    assert "'shouty' is not one of the choices: 'plain', 'loud'" in line_for("4", "mode")
    assert "expects STRING but output 0 of node 1 'MakeNumber' gives INT" in line_for("4", "path")
    assert "missing required input" in line_for("7", "path") and "'Other'" in line_for("7", "path")
    assert ("node 8 'Typo' (Nonsense): node 10 'Needs typo' (WriteText) needs it, but no "
            "'Nonsense' node runs here: run this workflow in ComfyUI") in line_for("8", None)
    assert "below the minimum 0" in line_for("9", "value")
    assert "'xl' is not one of the choices: 's', 'm'" in line_for("9", "size")
    assert "'a.png' must end with .txt" in line_for("9", "name")  # from VALIDATE_INPUTS
    assert CALLS == []


def test_a_stray_half_wired_node_does_not_stop_the_run(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["5"]["inputs"] = {}  # missing its value, but nothing needs node 5
    assert run_workflow(graph, REGISTRY).outputs == {"4": ("n=5",)}


def test_a_workflow_without_output_node_is_an_error():
    with pytest.raises(WorkflowError, match="no output node"):
        run_workflow({"1": {"class_type": "MakeNumber", "inputs": {"value": 1}}}, REGISTRY)


# --- nodes no output needs, and nodes only ComfyUI runs -------------------------------------------

def test_every_node_no_output_needs_is_skipped_and_named_whatever_its_type(tmp_path):
    graph = api_graph(tmp_path / "out.txt")  # node 5 is a registry node nothing needs
    graph.update({
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": 1},
               "_meta": {"title": "Sampler"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0]}},
        "13": {"class_type": "AddNumbers", "inputs": {"a": ["11", 0], "b": 1},
               "_meta": {"title": "Needs sampler"}},
        "14": {"class_type": "SomePack.FancyUpscale", "inputs": {"number": ["3", 0], "x": [1, 2, 3]}},
    })
    events = []
    result = run_workflow(graph, REGISTRY, on_event=events.append)
    assert result.outputs == {"4": ("n=5",)} and set(result.executed) == {"1", "2", "3", "4"}
    skipped = {s["node_id"]: s for s in result.skipped}
    assert set(skipped) == {"5", "10", "11", "12", "13", "14"}
    assert skipped["11"]["title"] == "Sampler" and skipped["11"]["class_type"] == "KSampler"
    for node_id in ("10", "11", "12", "14"):
        assert skipped[node_id]["reason"] == "only ComfyUI can run it (no such node here); no output here needs it"
    assert skipped["13"]["reason"] == skipped["5"]["reason"] == "no output node needs it"
    assert [e["node_id"] for e in events if e["kind"] == "skipped"] == list(skipped)


def test_a_needed_node_only_comfyui_runs_is_an_error_naming_it_and_what_to_do(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["2"] = {"class_type": "SomePack.FancyNumber", "inputs": {"seed": 3},
                  "_meta": {"title": "Fancy"}}
    with pytest.raises(WorkflowError) as caught:
        run_workflow(graph, REGISTRY)
    assert str(caught.value) == (
        "node 2 'Fancy' (SomePack.FancyNumber): node 3 'Sum' (AddNumbers) needs it, but no "
        "'SomePack.FancyNumber' node runs here: run this workflow in ComfyUI (with the pack "
        "that provides it), or, for one of ComfyUI's own nodes, with loralab run --comfyui DIR")
    assert CALLS == []


def test_only_comfyui_outputs_left_is_an_error_saying_nothing_runs(tmp_path):
    graph = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    with pytest.raises(WorkflowError, match="nothing left to run") as caught:
        run_workflow(graph, REGISTRY)
    assert "once these are skipped: 1 'EmptyLatentImage', 2 'VAEDecode', 3 'PreviewImage' (" in str(caught.value)


def test_nodes_only_comfyui_runs_in_ui_format_are_skipped_too(tmp_path):
    workflow = ui_graph(tmp_path / "out.txt")
    workflow["nodes"] += [
        ui_node(20, "UNETLoader", ["flux.safetensors", "default"],
                outputs=[{"name": "MODEL", "type": "MODEL", "links": [20]}]),
        ui_node(21, "LoraLoaderModelOnly", ["a.safetensors", 1.0],
                inputs=[socket("model", "MODEL", 20)]),
    ]
    workflow["links"].append([20, 20, 0, 21, 0, "MODEL"])
    result = run_workflow(workflow, REGISTRY)
    assert result.outputs == {"4": ("n=5",)}
    assert {s["node_id"] for s in result.skipped} == {"5", "20", "21"}


def test_a_chain_far_deeper_than_the_recursion_limit_validates_and_runs(tmp_path):
    depth = 4 * sys.getrecursionlimit()
    graph = {"0": {"class_type": "MakeNumber", "inputs": {"value": 1}}}
    for index in range(1, depth):
        graph[str(index)] = {"class_type": "AddNumbers", "inputs": {"a": [str(index - 1), 0], "b": 1}}
    graph["out"] = {"class_type": "WriteText", "inputs": {"number": [str(depth - 1), 0],
                                                          "path": str(tmp_path / "o.txt"), "mode": "plain"}}
    order = validate(graph, REGISTRY)
    assert order == [str(index) for index in range(depth)] + ["out"]
    assert run_workflow(graph, REGISTRY).outputs == {"out": (str(depth),)}


def test_a_loop_the_outputs_need_is_named_and_one_they_do_not_is_skipped(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["20"] = {"class_type": "AddNumbers", "inputs": {"a": ["21", 0], "b": 1}}
    graph["21"] = {"class_type": "AddNumbers", "inputs": {"a": ["20", 0], "b": 1}}
    assert run_workflow(graph, REGISTRY).outputs == {"4": ("n=5",)}
    graph["3"]["inputs"]["b"] = ["20", 0]
    with pytest.raises(WorkflowError, match="is part of a loop of links"):
        validate(graph, REGISTRY)


# --- interrupt --------------------------------------------------------------------------------

def test_a_stop_request_ends_the_run_between_nodes(tmp_path):
    graph = api_graph(tmp_path / "out.txt")
    graph["3"] = {"class_type": "StopAfterMe", "inputs": {"number": ["1", 0]},
                  "_meta": {"title": "Trainer"}}
    with pytest.raises(WorkflowInterrupted) as caught:
        run_workflow(graph, REGISTRY)
    assert caught.value.completed == ["1", "3"]
    assert "node 4 'WriteText'" in str(caught.value)
    assert not (tmp_path / "out.txt").exists()


def test_a_stale_stop_request_does_not_stop_the_next_run(tmp_path):
    interrupt.request_stop()
    assert run_workflow(api_graph(tmp_path / "out.txt"), REGISTRY).outputs == {"4": ("n=5",)}


def test_first_ctrl_c_requests_a_stop_and_the_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    interrupt.request_stop()
    with interrupt.handle_ctrl_c(message=None):
        assert not interrupt.stop_requested()  # cleared on entry
        signal.raise_signal(signal.SIGINT)
        assert interrupt.stop_requested()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
