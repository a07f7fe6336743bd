"""Running a validated prompt: each needed node once, dependencies first, with progress events."""

import time
from dataclasses import dataclass, field

from . import interrupt
from .errors import NodeFailed, WorkflowInterrupted
from .formats import ApiPrompt, is_link
from .node_types import declared_inputs, is_output_node, return_types
from .plan import links_of


@dataclass
class RunResult:
    """outputs: {node_id: tuple} of every output node that ran (intermediate values are let go
    as soon as their last consumer has run, so big models do not outlive their use).
    ui: {node_id: dict} the "ui" part of nodes that returned {"ui": ..., "result": ...}.
    executed: node ids in the order they ran. skipped: {node_id, title, class_type, reason}
    for every node that did not run. seconds: the whole run; node_seconds: per node."""

    outputs: dict = field(default_factory=dict)
    ui: dict = field(default_factory=dict)
    executed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    node_seconds: dict = field(default_factory=dict)


def execute(prompt: ApiPrompt, order: list, registry: dict, on_event=None) -> RunResult:
    emit = on_event or (lambda event: None)
    result = RunResult(skipped=list(prompt.skipped))
    for entry in prompt.skipped:
        emit({"kind": "skipped", **entry})
    last_use = _last_use(prompt, order)
    values, started = {}, time.perf_counter()
    for index, node_id in enumerate(order, 1):
        node = prompt.nodes[node_id]
        about = {"node_id": node_id, "title": prompt.title(node_id),
                 "class_type": node["class_type"], "index": index, "total": len(order)}
        if interrupt.stop_requested():
            raise WorkflowInterrupted(result.executed, f"node {node_id} '{about['title']}'")
        emit({"kind": "node_start", **about})
        node_started = time.perf_counter()
        node_class = registry[node["class_type"]]
        outputs, ui = _call_node(prompt, node_id, node_class, values)
        seconds = time.perf_counter() - node_started
        values[node_id] = outputs
        result.executed.append(node_id)
        result.node_seconds[node_id] = seconds
        if is_output_node(node_class):
            result.outputs[node_id] = outputs
        if ui is not None:
            result.ui[node_id] = ui
        emit({"kind": "node_done", **about, "seconds": seconds})
        for source in [s for s in values if last_use.get(s) == index - 1]:
            del values[source]  # its last consumer has run
    result.seconds = time.perf_counter() - started
    return result


def _last_use(prompt, order) -> dict:
    """For each node, the position in `order` of the last node that reads its outputs."""
    last = {}
    for position, node_id in enumerate(order):
        for source, _ in links_of(prompt.nodes[node_id]):
            last[source] = position
    return last


def _call_node(prompt, node_id, node_class, values):
    title, kind = prompt.title(node_id), prompt.nodes[node_id]["class_type"]
    kwargs = _gather_inputs(prompt, node_id, node_class, values)
    function = getattr(node_class, "FUNCTION", None)
    try:
        returned = getattr(node_class(), function)(**kwargs)
    except (WorkflowInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:
        # a node's own one-line error (nodes.errors.NodeError) already names what failed
        reason = str(exc) if hasattr(exc, "original") else f"{type(exc).__name__}: {exc}"
        raise NodeFailed(node_id, title, kind, reason) from exc
    ui = None
    if isinstance(returned, dict):  # ComfyUI's {"ui": ..., "result": (...)}
        ui, returned = returned.get("ui"), returned.get("result", ())
    if returned is None:
        returned = ()
    if not isinstance(returned, (tuple, list)):
        raise NodeFailed(node_id, title, kind,
                         f"{function}() returned {type(returned).__name__}, not a tuple")
    declared = len(return_types(node_class))
    if len(returned) < declared:
        raise NodeFailed(node_id, title, kind, f"{function}() returned {len(returned)} "
                                               f"value(s); RETURN_TYPES declares {declared}")
    return tuple(returned), ui


# Hidden inputs ComfyUI fills in itself; others are passed only when the prompt gives them.
def _hidden_value(kind, prompt, node_id):
    if kind == "UNIQUE_ID":
        return node_id
    if kind == "PROMPT":
        return prompt.nodes
    if kind == "EXTRA_PNGINFO":
        return {"workflow": prompt.ui_workflow} if prompt.ui_workflow else {}
    return None


def _gather_inputs(prompt, node_id, node_class, values) -> dict:
    inputs = prompt.nodes[node_id]["inputs"]
    kwargs = {}
    for spec in declared_inputs(node_class):
        if spec.name in inputs:
            value = inputs[spec.name]
            kwargs[spec.name] = values[value[0]][value[1]] if is_link(value) else value
        elif spec.section == "hidden":
            value = _hidden_value(spec.type, prompt, node_id)
            if value is not None:
                kwargs[spec.name] = value
    return kwargs
