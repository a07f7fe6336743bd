"""Checking a prompt before anything runs, collecting every problem into one WorkflowError.

Like ComfyUI, every node's type is checked but inputs only of the nodes the outputs need: a
stray half-wired node on the canvas does not stop a run.
"""

import inspect
import math

from .errors import WorkflowError, found, make_problem, shown
from .formats import ApiPrompt, is_link
from .node_types import declared_inputs, is_output_node, return_types, types_match
from .plan import needed_nodes


def validate_prompt(prompt: ApiPrompt, registry: dict) -> list:
    """The ids of the nodes to run, in order; raises WorkflowError listing every problem."""
    problems = list(prompt.problems)
    skipped = prompt.skipped_by_id()
    runnable = {node_id: node for node_id, node in prompt.nodes.items() if node_id not in skipped}
    for node_id, node in runnable.items():
        if node["class_type"] not in registry:
            problems.append(_problem(prompt, node_id, None,
                                     f"unknown node type '{node['class_type']}'"))
    outputs = [node_id for node_id, node in runnable.items()
               if node["class_type"] in registry and is_output_node(registry[node["class_type"]])]
    if not outputs:
        problems.append(make_problem(None, None, None, _nothing_to_run(prompt)))
    order, loop = needed_nodes(prompt, outputs)
    if loop is not None:
        problems.append(_problem(prompt, loop, None, "is part of a loop of links"))
    for node_id in order:
        if (node_id in runnable and runnable[node_id]["class_type"] in registry
                and (node_id, None) not in prompt.reported):
            problems.extend(_check_node(prompt, node_id, registry))
    if problems:
        raise WorkflowError(problems)
    return order


def _nothing_to_run(prompt) -> str:
    if prompt.skipped:
        names = ", ".join(f"{s['node_id']} '{s['title']}'" for s in prompt.skipped)
        return f"nothing left to run: no output node remains once these are skipped: {names}"
    return "nothing to run: the workflow has no output node (e.g. a save node)"


def _problem(prompt, node_id, input_name, message):
    node = prompt.nodes.get(node_id, {})
    return make_problem(node_id, prompt.title(node_id), input_name, message,
                        node.get("class_type"))


def _check_node(prompt: ApiPrompt, node_id, registry) -> list:
    node_class = registry[prompt.nodes[node_id]["class_type"]]
    inputs = prompt.nodes[node_id]["inputs"]
    self_checked = _validate_inputs_params(node_class)
    problems = []
    if not callable(getattr(node_class, str(getattr(node_class, "FUNCTION", None)), None)):
        problems.append(_problem(prompt, node_id, None,
                                 "the node class has no method named by its FUNCTION"))
    for spec in declared_inputs(node_class):
        if spec.section == "hidden" or (node_id, spec.name) in prompt.reported:
            continue
        if spec.name not in inputs:
            if spec.section == "required":
                problems.append(_problem(prompt, node_id, spec.name, "missing required input"))
            continue
        value = inputs[spec.name]
        if is_link(value):
            message = _check_link(prompt, value, spec, registry)
        elif spec.name in self_checked:
            message = None  # the node's VALIDATE_INPUTS checks it instead
        else:
            message = check_value(spec, value)
        if message:
            problems.append(_problem(prompt, node_id, spec.name, message))
    message = _run_validate_inputs(node_class, inputs, self_checked)
    if message:
        checked = ", ".join(sorted(self_checked)) or None
        problems.append(_problem(prompt, node_id, checked, message))
    return problems


def _check_link(prompt, link, spec, registry):
    source_id, slot = link
    skipped = prompt.skipped_by_id().get(source_id)
    if skipped is not None and source_id not in prompt.nodes:
        return (f"is linked to {skipped['reason']} node {source_id} '{skipped['title']}', "
                "which does not run")
    if source_id not in prompt.nodes and (source_id, None) in prompt.reported:
        return None  # a node of the wrong shape: its own problem says so
    if source_id not in prompt.nodes:
        return f"is linked to node {source_id}, which is not in the workflow"
    source_class = registry.get(prompt.nodes[source_id]["class_type"])
    if source_class is None:
        return None  # reported as an unknown node type already
    types = return_types(source_class)
    source = f"node {source_id} '{prompt.title(source_id)}'"
    if not 0 <= slot < len(types):
        return f"is linked to output {slot} of {source}, which has {len(types)} output(s)"
    if not types_match(types[slot], spec.type):
        return f"expects {spec.type} but output {slot} of {source} gives {types[slot]}"
    return None


def check_value(spec, value):
    """Why a constant does not fit its declared input, or None when it does."""
    if spec.type == "COMBO":
        if spec.choices and value not in spec.choices:
            choices = ", ".join(repr(c) for c in spec.choices[:12])
            more = ", ..." if len(spec.choices) > 12 else ""
            return f"{shown(value)} is not one of the choices: {choices}{more}"
        return None
    wanted = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}
    if spec.type not in wanted:
        if "*" in str(spec.type).split(","):
            return None  # an "any" input takes constants too
        return (f"expects a link from a node's {spec.type} output, found {found(value)}")
    if not isinstance(value, wanted[spec.type]) or (
            isinstance(value, bool) and spec.type != "BOOLEAN"):
        return f"expects {spec.type}, got {type(value).__name__} {shown(value)}"
    low, high = spec.options.get("min"), spec.options.get("max")
    if spec.type == "FLOAT" and not math.isfinite(value):
        return f"expects a finite number, got {value!r}"
    if spec.type in ("INT", "FLOAT"):
        if low is not None and value < low:
            return f"{shown(value)} is below the minimum {low!r}"
        if high is not None and value > high:
            return f"{shown(value)} is above the maximum {high!r}"
    return None


def _validate_inputs_params(node_class) -> set:
    """Input names the node's VALIDATE_INPUTS takes (ComfyUI then skips its own checks on them)."""
    check = getattr(node_class, "VALIDATE_INPUTS", None)
    if check is None:
        return set()
    return {name for name, param in inspect.signature(check).parameters.items()
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)}


def _run_validate_inputs(node_class, inputs, params):
    """Call VALIDATE_INPUTS with the constant inputs it names: True, or a message why not."""
    check = getattr(node_class, "VALIDATE_INPUTS", None)
    if check is None:
        return None
    signature = inspect.signature(check)
    takes_all = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    given = {name: value for name, value in inputs.items()
             if not is_link(value) and (takes_all or name in params)}
    for name, param in signature.parameters.items():
        if param.default is param.empty and param.kind not in (
                param.VAR_KEYWORD, param.VAR_POSITIONAL) and name not in given:
            return None  # a value only known at run time (a link): cannot check it now
    try:
        verdict = check(**given)
    except Exception as exc:  # a broken check is a problem to report, not a crash
        return f"VALIDATE_INPUTS raised {type(exc).__name__}: {exc}"
    return None if verdict is True else str(verdict)
