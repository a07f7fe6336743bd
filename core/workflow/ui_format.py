"""Converting the editor's (UI) workflow format to the API format, as the editor itself does
before queueing: widgets_values -> named inputs, links resolved through Reroute, PrimitiveNode
and bypassed nodes, muted nodes dropped."""

from .errors import make_problem
from .formats import ApiPrompt
from .node_types import CONTROL_VALUES, declared_inputs

MUTED, BYPASSED = 2, 4
IGNORED_TYPES = frozenset({"Note", "MarkdownNote"})  # comments on the canvas
RESOLVED_TYPES = frozenset({"Reroute", "PrimitiveNode"})  # replaced by what they carry


class _Constant:
    """A value fed by a PrimitiveNode instead of a link."""

    def __init__(self, value):
        self.value = value


def ui_to_api(workflow: dict, registry: dict) -> ApiPrompt:
    graph = _UiGraph(workflow)
    prompt = ApiPrompt(nodes={}, ui_workflow=workflow)
    for node in workflow["nodes"]:
        node_id, kind = str(node.get("id")), node.get("type")
        title = node.get("title") or kind
        if kind in IGNORED_TYPES or kind in RESOLVED_TYPES:
            continue
        mode = node.get("mode", 0)
        if mode in (MUTED, BYPASSED):
            reason = "muted" if mode == MUTED else "bypassed"
            prompt.skipped.append({"node_id": node_id, "title": title, "class_type": kind,
                                   "reason": reason})
            continue
        node_class = registry.get(kind)
        inputs = _widget_inputs(node, node_class) if node_class is not None else {}
        for socket in node.get("inputs") or []:
            name = (socket.get("widget") or {}).get("name") or socket.get("name")
            source = graph.resolve(socket.get("link"), socket.get("type"), prompt.problems,
                                   node_id, title, name)
            if isinstance(source, _Constant):
                inputs[name] = source.value
            elif source is not None:
                inputs[name] = list(source)
        prompt.nodes[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _widget_inputs(node: dict, node_class) -> dict:
    """Name the widgets_values of a node by its widget inputs (required, then optional)."""
    widgets = [spec for spec in declared_inputs(node_class) if spec.is_widget]
    values = node.get("widgets_values")
    if isinstance(values, dict):  # newer frontends save them by name
        return {spec.name: values[spec.name] for spec in widgets if spec.name in values}
    values, named, index = list(values or []), {}, 0
    for spec in widgets:
        if index >= len(values):
            break
        named[spec.name] = values[index]
        index += 1
        # The "control after generate" choice is saved right after the value; it is no input.
        if spec.has_control_value and index < len(values) and values[index] in CONTROL_VALUES:
            index += 1
    return named


class _UiGraph:
    def __init__(self, workflow: dict):
        self.nodes = {str(node.get("id")): node for node in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):  # the newer schema's link objects
                link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"),
                        link.get("target_id"), link.get("target_slot"), link.get("type")]
            self.links[link[0]] = (str(link[1]), link[2])

    def resolve(self, link_id, wanted_type, problems, node_id, title, input_name):
        """Follow a link to the node output (or PrimitiveNode value) that really feeds it.

        Returns (source_id, slot), a _Constant, or None when nothing feeds it (an unlinked
        Reroute, a bypassed node with no input of the type).
        """
        seen = set()
        while link_id is not None:
            if link_id in seen or link_id not in self.links:
                why = "a link loop" if link_id in seen else f"link {link_id}, missing from links"
                problems.append(make_problem(node_id, title, input_name, f"is fed through {why}"))
                return None
            seen.add(link_id)
            source_id, slot = self.links[link_id]
            source = self.nodes.get(source_id)
            is_real = source is not None and source.get("type") not in RESOLVED_TYPES and (
                source.get("mode", 0) != BYPASSED)
            if source is None or is_real:
                return source_id, slot  # a real node (or a missing one: validate says so)
            if source.get("type") == "PrimitiveNode":
                values = source.get("widgets_values") or []
                return _Constant(values[0]) if values else None
            if source.get("type") == "Reroute":
                link_id = _input_link(source, 0)
            else:
                link_id = _bypass_link(source, slot, _output_type(source, slot, wanted_type))
        return None


def _input_link(node, index):
    sockets = node.get("inputs") or []
    return sockets[index].get("link") if index < len(sockets) else None


def _output_type(node, slot, fallback):
    outputs = node.get("outputs") or []
    return (outputs[slot].get("type") if slot < len(outputs) else None) or fallback


def _bypass_link(node, slot, wanted_type):
    """A bypassed node passes an input through to an output of the same type: the input at
    the output's own index if its type matches, else the first input of that type."""
    sockets = node.get("inputs") or []
    if slot < len(sockets) and sockets[slot].get("type") == wanted_type:
        return sockets[slot].get("link")
    for socket in sockets:
        if socket.get("type") == wanted_type:
            return socket.get("link")
    return None
