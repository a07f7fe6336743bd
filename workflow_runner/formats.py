"""Reading workflow JSON, telling the two ComfyUI formats apart, and the API-format prompt."""

import json
import os
import stat
from dataclasses import dataclass, field

from .errors import WorkflowError, found, make_problem

MAX_WORKFLOW_BYTES = 64 * 2**20  # far above a saved workflow; a huge file is refused unread
# Keys only the editor's (UI) format has at its top level.
UI_KEYS = ("nodes", "links", "last_node_id", "last_link_id", "groups", "version")


@dataclass
class ApiPrompt:
    """An API-format graph ready to validate and run.

    nodes: {node_id: {"class_type", "inputs", "_meta": {"title"}}}, links as [source_id, slot],
        ids as strings. Nodes that no output needs stay in it (they are listed in `skipped`
        too); converted from the UI format, a node of a type the registry lacks keeps only its
        links, since naming widgets_values needs the class's INPUT_TYPES.
    skipped: nodes that will not run, each {node_id, title, class_type, reason}: muted and
        bypassed nodes of a UI workflow, and every node that no output node needs.
    problems: what went wrong while converting (validate() reports them with its own).
    reported: (node_id, input name or None) already in problems: validate() does not check
        that input (None: that node's inputs) again.
    ui_workflow: the editor workflow this came from, if any (given to nodes as EXTRA_PNGINFO).
    """

    nodes: dict
    skipped: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    reported: set = field(default_factory=set)
    ui_workflow: dict | None = None

    def title(self, node_id) -> str:
        node = self.nodes.get(node_id) or self.skipped_by_id().get(node_id) or {}
        meta_title = (node.get("_meta") or {}).get("title")
        return meta_title or node.get("title") or node.get("class_type") or "?"

    def skipped_by_id(self) -> dict:
        return {entry["node_id"]: entry for entry in self.skipped}


def _not_a_workflow(message):
    return WorkflowError([make_problem(None, None, None, message)])


def _read_regular(path) -> bytes:
    """A regular file's bytes; a FIFO (which would wait for a writer), a device or a folder is
    refused unread, and so is a file over MAX_WORKFLOW_BYTES. (core/io holds LoRA Lab's rule for
    this; the runner imports nothing of LoRA Lab, so it keeps these few lines of its own.)"""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_workflow(f"{path} is not a regular file (a FIFO, device or folder): not read")
        if info.st_size > MAX_WORKFLOW_BYTES:
            raise _not_a_workflow(f"{path} is {info.st_size} bytes, over the {MAX_WORKFLOW_BYTES} "
                                  "a workflow may be: not read")
        os.set_blocking(fd, True)
        return handle.read()


def load_workflow(path_or_dict) -> dict:
    """A workflow dict from a dict or a JSON file; bad JSON names the file, line and column."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = os.fspath(path_or_dict)
    try:
        workflow = json.loads(_read_regular(path).decode("utf-8"))
    except WorkflowError:
        raise
    except FileNotFoundError:
        raise _not_a_workflow(f"workflow file not found: {path}")
    except RecursionError:
        raise _not_a_workflow(f"{path} nests lists or objects too deeply to be a workflow")
    except json.JSONDecodeError as exc:
        raise _not_a_workflow(
            f"{path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except UnicodeDecodeError as exc:
        raise _not_a_workflow(f"{path} is not a workflow: byte {exc.start} is not UTF-8 text "
                              "(expected a JSON file)")
    except (OSError, ValueError) as exc:
        raise _not_a_workflow(f"{path} cannot be read as a workflow: {exc}")
    if not isinstance(workflow, dict):
        raise _not_a_workflow(f"{path} holds {found(workflow)}, not a workflow object "
                              "(expected {node_id: {class_type, inputs}} or the editor's format)")
    return workflow


def _is_api_node(value) -> bool:
    return isinstance(value, dict) and "class_type" in value


def unwrap_workflow(workflow: dict) -> dict:
    """Accept what ComfyUI writes around an API-format prompt: the body of POST /prompt
    {"prompt": {...}, "extra_data": ...}, a /history entry {"prompt": [number, id, {...},
    extra_data, outputs], "outputs": ...}, and /history's own {prompt_id: entry}."""
    if len(workflow) == 1:
        (only,) = workflow.values()
        if isinstance(only, dict) and "prompt" in only and not _is_api_node(only):
            workflow = only
    if "prompt" not in workflow or _is_api_node(workflow["prompt"]):
        return workflow
    inner = workflow["prompt"]
    if isinstance(inner, list) and len(inner) >= 3 and isinstance(inner[2], dict):
        inner = inner[2]  # a /history entry
    if not isinstance(inner, dict):
        raise _not_a_workflow(
            f"not a workflow: its 'prompt' holds {found(inner)}, expected the API-format "
            "workflow object ({node_id: {class_type, inputs}}), as in ComfyUI's /prompt body")
    return inner


def is_ui_workflow(workflow: dict) -> bool:
    """The editor's format has a `nodes` list; the API format is {id: {class_type, inputs}}."""
    if isinstance(workflow.get("nodes"), list):
        return True
    return any(key in workflow and not _is_api_node(workflow[key]) for key in UI_KEYS)


def is_link(value) -> bool:
    """In the API format any [source_id, output_index] pair is a link, as ComfyUI reads it."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def api_prompt_from_dict(workflow: dict) -> ApiPrompt:
    """Normalise an API-format dict: string ids, a title for every node. A node, or an input,
    of the wrong shape is a problem (validate() reports it), never an exception."""
    prompt = ApiPrompt(nodes={})
    for node_id, node in unwrap_workflow(workflow).items():
        node_id = str(node_id)
        if not isinstance(node, dict):
            prompt.problems.append(make_problem(node_id, None, None, (
                f"found {found(node)}, expected a node object with class_type and inputs")))
            prompt.reported.add((node_id, None))
            continue
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        kind = node.get("class_type")
        if not has_node_type(prompt, node_id, title, "class_type", kind):
            continue
        title = title if isinstance(title, str) and title else kind
        prompt.nodes[node_id] = {"class_type": kind, "inputs": _api_inputs(
            prompt, node_id, title, kind, node.get("inputs")), "_meta": {"title": title}}
    return prompt


def has_node_type(prompt, node_id, title, key, kind) -> bool:
    """Whether a node's type (class_type, or type in the editor's format) is a name; when not,
    says so in prompt.problems, and validate() checks nothing more of the node."""
    if isinstance(kind, str) and kind.strip():
        return True
    title = title if isinstance(title, str) and title else None
    prompt.problems.append(make_problem(node_id, title, None, (
        f"{key} is {found(kind)}, expected the node type's name (a string)")))
    prompt.reported.add((node_id, None))
    return False


def _api_inputs(prompt, node_id, title, kind, given) -> dict:
    if given is None:
        return {}
    if not isinstance(given, dict):
        prompt.problems.append(make_problem(node_id, title, None, (
            f"inputs is {found(given)}, expected an object of input names to values or "
            "[node_id, output_index] links"), kind))
        prompt.reported.add((node_id, None))
        return {}
    inputs = {}
    for name, value in given.items():
        if isinstance(value, list) and not is_link(value):
            prompt.problems.append(make_problem(node_id, title, name, (
                f"is {found(value)}, expected a value or a link [node_id, output_index] "
                "(a node id, then a whole number)"), kind))
            prompt.reported.add((node_id, name))
        else:
            inputs[name] = [str(value[0]), value[1]] if is_link(value) else value
    return inputs
