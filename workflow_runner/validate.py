"""Checking a prompt before anything runs, collecting every problem into one WorkflowError.

Only the nodes the outputs need are checked: a stray half-wired node, or another pack's node
that nothing needs, does not stop a run (plan.py lists them as skipped). A needed node that is
not in the registry is a problem naming it and what to do.
"""

import inspect
import math

from .errors import WorkflowError, describe_node, found, make_problem, shown
from .formats import ApiPrompt, is_link
from .node_types import declared_inputs, return_types, types_match
from .plan import links_of, needed_nodes, output_nodes


def validate_prompt(prompt: ApiPrompt, registry: dict) -> list:
    """The ids of the nodes to run, in order; raises WorkflowError listing every problem."""
    outputs = output_nodes(prompt, registry)
    order, loop = needed_nodes(prompt, outputs)
    problems = _file_problems(prompt, set(order))
    if not outputs:
        problems.append(make_problem(None, None, None, _nothing_to_run(prompt)))
    if loop is not None:
        problems.append(_problem(prompt, loop, None, "is part of a loop of links"))
    for node_id in order:
        if prompt.nodes[node_id]["class_type"] not in registry:
            problems.append(_problem(prompt, node_id, None, _not_here(prompt, node_id, order)))
        elif (node_id, None) not in prompt.reported:
            problems.extend(_check_node(prompt, node_id, registry))
    if problems:
        raise WorkflowError(problems)
    return order


def _file_problems(prompt, needed) -> list:
    """What reading the file found wrong, less what is about a node that is skipped anyway.
    A node left out for its shape (no type, not an object) is kept: what needs it is unknown."""
    return [problem for problem in prompt.problems if problem["node_id"] is None
            or problem["node_id"] in needed or problem["node_id"] not in prompt.nodes]


def _not_here(prompt, node_id, order) -> str:
    """Why a needed node that is not in the registry stops the run, and what to do."""
    user = next(other for other in order if node_id in {s for s, _ in links_of(prompt.nodes[other])})
    kind = prompt.nodes[node_id]["class_type"]
    return (f"{describe_node(user, prompt.title(user), prompt.nodes[user]['class_type'])} needs "
            f"it, but no '{kind}' node runs here: run this workflow in ComfyUI (with the pack "
            "that provides it), or, for one of ComfyUI's own nodes, with loralab run "
            "--comfyui DIR")


def _nothing_to_run(prompt) -> str:
    if prompt.skipped:
        names = [f"{s['node_id']} '{s['title']}'" for s in prompt.skipped]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return ("nothing left to run: no output node remains once these are skipped: "
                f"{', '.join(names[:8])}{more} (ComfyUI's own output nodes, e.g. SaveImage, "
                "run headless only with --comfyui DIR)")
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
        return None  # a needed node no registry class runs: its own problem says so
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
