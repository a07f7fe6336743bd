"""Converting the editor's (UI) workflow format to the API format, as the editor itself does
before queueing: widgets_values -> named inputs, links resolved through Reroute, PrimitiveNode
and bypassed nodes, muted nodes dropped."""

from .errors import WorkflowError, found, make_problem
from .formats import ApiPrompt, has_node_type
from .node_types import CONTROL_VALUES, declared_inputs

MUTED, BYPASSED = 2, 4
IGNORED_TYPES = frozenset({"Note", "MarkdownNote"})  # comments on the canvas
RESOLVED_TYPES = frozenset({"Reroute", "PrimitiveNode"})  # replaced by what they carry


class _Constant:
    """A value fed by a PrimitiveNode instead of a link."""

    def __init__(self, value):
        self.value = value


def ui_to_api(workflow: dict, registry: dict) -> ApiPrompt:
    prompt = ApiPrompt(nodes={}, ui_workflow=workflow)
    if not isinstance(workflow.get("nodes"), list):
        raise WorkflowError([make_problem(None, None, None, (
            f"not a workflow: its 'nodes' is {found(workflow.get('nodes'))}, expected the "
            "editor's list of node objects"))])
    nodes = _ui_nodes(workflow["nodes"], prompt)
    graph = _UiGraph(nodes, _ui_links(workflow.get("links"), nodes, prompt.problems))
    for node in nodes:
        node_id, kind, title = node["id"], node["type"], node["title"]
        if kind in IGNORED_TYPES or kind in RESOLVED_TYPES:
            continue
        if node["mode"] in (MUTED, BYPASSED):
            reason = "muted" if node["mode"] == MUTED else "bypassed"
            prompt.skipped.append({"node_id": node_id, "title": title, "class_type": kind,
                                   "reason": reason})
            continue
        node_class = registry.get(kind)
        inputs = _widget_inputs(node, node_class, prompt) if node_class is not None else {}
        for socket in node["inputs"]:
            name = socket["name"]
            source = graph.resolve(socket["link"], socket["type"], prompt.problems,
                                   node_id, title, name)
            if isinstance(source, _Constant):
                inputs[name] = source.value
            elif source is not None:
                inputs[name] = list(source)
        prompt.nodes[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value != ""


def _ui_nodes(entries: list, prompt: ApiPrompt) -> list:
    """The entries of `nodes` as {id, type, title, mode, inputs, outputs, widgets_values}, ids
    as strings. An entry of the wrong shape is a problem: without an id or a type it is left
    out; otherwise it stays, with no inputs, and validate() does not check them again."""
    nodes, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"entry {index} of the workflow's nodes"
        if not isinstance(entry, dict):
            prompt.problems.append(make_problem(None, None, None, (
                f"{where} is {found(entry)}, expected a node object (id, type, inputs, "
                "widgets_values)")))
            continue
        node_id, kind, title = entry.get("id"), entry.get("type"), entry.get("title")
        if not _is_id(node_id):
            prompt.problems.append(make_problem(None, None, None, (
                f"{where} ({found(kind)}) has id {found(node_id)}, expected a number")))
            continue
        node_id = str(node_id)
        if not has_node_type(prompt, node_id, title, "type", kind):
            continue
        title = title if isinstance(title, str) and title else kind

        def bad(input_name, message):
            prompt.problems.append(make_problem(node_id, title, input_name, message, kind))
            prompt.reported.add((node_id, None))

        if node_id in seen:
            bad(None, f"{where} has the same id as an earlier node; each node needs its own")
            continue
        seen.add(node_id)
        node = {"id": node_id, "type": kind, "title": title, "mode": entry.get("mode") or 0,
                "inputs": [], "outputs": [], "widgets_values": entry.get("widgets_values")}
        if isinstance(node["mode"], bool) or not isinstance(node["mode"], int):
            bad(None, f"mode is {found(node['mode'])}, expected a number (0 runs, 2 muted, "
                      "4 bypassed)")
            node["mode"] = 0
        elif not isinstance(node["widgets_values"], (list, dict, type(None))):
            bad(None, f"widgets_values is {found(node['widgets_values'])}, expected a list of "
                      "the widgets' values")
            node["widgets_values"] = None
        else:
            node["inputs"] = _ui_sockets(entry.get("inputs"), "inputs", bad)
            node["outputs"] = _ui_sockets(entry.get("outputs"), "outputs", bad)
        nodes.append(node)
    return nodes


def _ui_sockets(sockets, key, bad) -> list:
    """A node's inputs or outputs as [{name, type, link}]; [] (and a problem) when malformed."""
    if sockets is None:
        return []
    if not isinstance(sockets, list):
        bad(None, f"{key} is {found(sockets)}, expected a list of socket objects")
        return []
    clean = []
    for index, socket in enumerate(sockets):
        if not isinstance(socket, dict):
            bad(None, f"{key}[{index}] is {found(socket)}, expected a socket object "
                      "(name, type, link)")
            return []
        widget = socket.get("widget")
        name = (widget.get("name") if isinstance(widget, dict) else None) or socket.get("name")
        link = socket.get("link")
        if key == "inputs" and not isinstance(name, str):  # a Reroute's is ""
            bad(None, f"inputs[{index}] has name {found(name)}, expected the input's name")
            return []
        if key == "inputs" and link is not None and not _is_id(link):
            bad(name, f"its link is {found(link)}, expected a link id (a number) or null")
            return []
        clean.append({"name": name, "type": socket.get("type"), "link": link})
    return clean


LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _ui_links(links, nodes, problems) -> dict:
    """{link_id: (origin_id, origin_slot)} from the workflow's `links`; each malformed or
    self link is a problem (about the node it ends at, when that is known)."""
    if links is None:
        return {}
    if not isinstance(links, list):
        problems.append(make_problem(None, None, None, (
            f"the workflow's links is {found(links)}, expected a list of "
            f"[{', '.join(LINK_FIELDS)}] entries")))
        return {}
    by_id, clean = {node["id"]: node for node in nodes}, {}
    for index, link in enumerate(links):
        if isinstance(link, dict):  # the newer schema's link objects
            link = [link.get(name) for name in LINK_FIELDS]
        if not isinstance(link, list) or len(link) != 6:
            problems.append(make_problem(None, None, None, (
                f"entry {index} of the workflow's links is {found(link)}, expected a link "
                f"[{', '.join(LINK_FIELDS)}]")))
            continue
        link_id, origin, slot, target, target_slot, _ = link
        node = by_id.get(str(target)) if _is_id(target) else None
        where = (node["id"], node["title"], None, node["type"]) if node else (None, None, None)
        why = None
        if not _is_id(link_id):
            why = f"has id {found(link_id)}, expected a number"
        elif link_id in clean:
            why = "has the same id as an earlier link; each link needs its own"
        elif not _is_id(origin) or not _is_id(target):
            why = (f"goes from node {found(origin)} to node {found(target)}, expected two "
                   "node ids")
        elif not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
            why = f"starts at output {found(slot)}, expected an output index (0, 1, ...)"
        elif str(origin) == str(target):
            why = f"goes from node {origin} back into itself, expected a link between two nodes"
        if why:
            message = f"link {link_id!r} (entry {index} of the workflow's links) {why}"
            problems.append(make_problem(*where[:3], message, *where[3:]))
            continue
        clean[link_id] = (str(origin), slot)
    return clean


def _widget_inputs(node: dict, node_class, prompt: ApiPrompt) -> dict:
    """Name the widgets_values of a node by its widget inputs (required, then optional); a
    list shorter than the required widgets, or longer than all of them, is a problem."""
    widgets = [spec for spec in declared_inputs(node_class) if spec.is_widget]
    values = node["widgets_values"]
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
    required = [spec for spec in widgets if spec.section == "required"]
    # extra values the editor may save: control choices and upload buttons
    extra = sum(spec.has_control_value + any(key.endswith("_upload") and on
                                             for key, on in spec.options.items())
                for spec in widgets)
    if (node["id"], None) in prompt.reported:
        return named  # the node's problem is said already
    if len(values) < len(required) or len(values) > len(widgets) + extra:
        names = ", ".join(spec.name for spec in widgets)
        wanted = (f"{len(required)}" if len(required) == len(widgets) + extra
                  else f"{len(required)} to {len(widgets) + extra}")
        prompt.problems.append(make_problem(node["id"], node["title"], None, (
            f"widgets_values holds {len(values)} value(s), expected {wanted}: one per widget "
            f"({names}), in order"), node["type"]))
        prompt.reported.add((node["id"], None))
    return named


class _UiGraph:
    def __init__(self, nodes: list, links: dict):
        self.nodes = {node["id"]: node for node in nodes}
        self.links = links

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
            is_real = source is not None and source["type"] not in RESOLVED_TYPES and (
                source["mode"] != BYPASSED)
            if source is None or is_real:
                return source_id, slot  # a real node (or a missing one: validate says so)
            if source["type"] == "PrimitiveNode":
                values = source["widgets_values"]
                return _Constant(values[0]) if isinstance(values, list) and values else None
            if source["type"] == "Reroute":
                link_id = _input_link(source, 0)
            else:
                link_id = _bypass_link(source, slot, _output_type(source, slot, wanted_type))
        return None


def _input_link(node, index):
    sockets = node["inputs"]
    return sockets[index]["link"] if index < len(sockets) else None


def _output_type(node, slot, fallback):
    outputs = node["outputs"]
    return (outputs[slot]["type"] if slot < len(outputs) else None) or fallback


def _bypass_link(node, slot, wanted_type):
    """A bypassed node passes an input through to an output of the same type: the input at
    the output's own index if its type matches, else the first input of that type."""
    sockets = node["inputs"]
    if slot < len(sockets) and sockets[slot]["type"] == wanted_type:
        return sockets[slot]["link"]
    for socket in sockets:
        if socket["type"] == wanted_type:
            return socket["link"]
    return None
