"""Reading workflow JSON, telling the two ComfyUI formats apart, and the API-format prompt."""

import json
import os
from dataclasses import dataclass, field

from .errors import WorkflowError, make_problem


@dataclass
class ApiPrompt:
    """An API-format graph ready to validate and run.

    nodes: {node_id: {"class_type", "inputs", "_meta": {"title"}}}, links as [source_id, slot],
        ids as strings. ComfyUI's own nodes stay in it (they are listed in `skipped` too);
        converted from the UI format, they and unknown types keep only their links, since
        naming widgets_values needs the class's INPUT_TYPES.
    skipped: nodes that will not run, each {node_id, title, class_type, reason}: muted and
        bypassed nodes of a UI workflow, ComfyUI nodes, and the nodes that need them.
    problems: what went wrong while converting (validate() reports them with its own).
    ui_workflow: the editor workflow this came from, if any (given to nodes as EXTRA_PNGINFO).
    """

    nodes: dict
    skipped: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    ui_workflow: dict | None = None

    def title(self, node_id) -> str:
        node = self.nodes.get(node_id) or self.skipped_by_id().get(node_id) or {}
        meta_title = (node.get("_meta") or {}).get("title")
        return meta_title or node.get("title") or node.get("class_type") or "?"

    def skipped_by_id(self) -> dict:
        return {entry["node_id"]: entry for entry in self.skipped}


def load_workflow(path_or_dict) -> dict:
    """A workflow dict from a dict or a JSON file; bad JSON names the file, line and column."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = os.fspath(path_or_dict)
    try:
        with open(path, encoding="utf-8") as handle:
            workflow = json.load(handle)
    except FileNotFoundError:
        raise WorkflowError([make_problem(None, None, None, f"workflow file not found: {path}")])
    except json.JSONDecodeError as exc:
        raise WorkflowError([make_problem(None, None, None, (
            f"{path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"))])
    if not isinstance(workflow, dict):
        raise WorkflowError([make_problem(None, None, None, (
            f"{path} holds a JSON {type(workflow).__name__}, not a workflow object"))])
    return workflow


def is_ui_workflow(workflow: dict) -> bool:
    """The editor's format has a `nodes` list; the API format is {id: {class_type, inputs}}."""
    return isinstance(workflow.get("nodes"), list)


def unwrap_api_prompt(workflow: dict) -> dict:
    """Accept the body of a POST /prompt too: {"prompt": {...}, "extra_data": ...}."""
    inner = workflow.get("prompt")
    if isinstance(inner, dict) and "class_type" not in workflow:
        return inner
    return workflow


def is_link(value) -> bool:
    """In the API format any [source_id, output_index] pair is a link, as ComfyUI reads it."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def api_prompt_from_dict(workflow: dict) -> ApiPrompt:
    """Normalise an API-format dict: string ids, a title for every node."""
    nodes, problems = {}, []
    for node_id, node in unwrap_api_prompt(workflow).items():
        node_id = str(node_id)
        if not isinstance(node, dict) or not node.get("class_type"):
            problems.append(make_problem(node_id, node_id, None,
                                         "not a node: expected an object with a class_type"))
            continue
        inputs = {}
        for name, value in (node.get("inputs") or {}).items():
            inputs[name] = [str(value[0]), value[1]] if is_link(value) else value
        title = (node.get("_meta") or {}).get("title") or node["class_type"]
        nodes[node_id] = {"class_type": node["class_type"], "inputs": inputs,
                          "_meta": {"title": title}}
    return ApiPrompt(nodes=nodes, problems=problems)
