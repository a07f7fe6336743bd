"""Which nodes run and in what order: ComfyUI's own nodes (and what needs them) are skipped,
and only what the output nodes need runs, dependencies first."""

from .comfy_builtin_names import COMFY_BUILTIN_NAMES
from .formats import ApiPrompt, is_link


def links_of(node: dict) -> list:
    """The (source_id, slot) pairs feeding a node."""
    return [(value[0], value[1]) for value in node["inputs"].values() if is_link(value)]


def skip_comfy_nodes(prompt: ApiPrompt, registry: dict) -> None:
    """Mark ComfyUI's built-in nodes that the registry lacks, then every node they feed."""
    skipped = {entry["node_id"] for entry in prompt.skipped}
    for node_id, node in prompt.nodes.items():
        kind = node["class_type"]
        if kind not in registry and kind in COMFY_BUILTIN_NAMES and node_id not in skipped:
            _skip(prompt, node_id, "ComfyUI node; it only runs inside ComfyUI")
            skipped.add(node_id)
    changed = True
    while changed:  # spread to dependents until nothing more is skipped
        changed = False
        for node_id, node in prompt.nodes.items():
            if node_id in skipped:
                continue
            needed = [source for source, _ in links_of(node)
                      if source in skipped and source in prompt.nodes]
            if needed:
                _skip(prompt, node_id, f"needs skipped node {needed[0]} "
                                       f"'{prompt.title(needed[0])}'")
                skipped.add(node_id)
                changed = True


def _skip(prompt, node_id, reason):
    prompt.skipped.append({"node_id": node_id, "title": prompt.title(node_id),
                           "class_type": prompt.nodes[node_id]["class_type"], "reason": reason})


def needed_nodes(prompt: ApiPrompt, output_ids: list) -> tuple:
    """The output nodes and every node they need, dependencies first (each once).

    Returns (order, cycle): cycle is a node id on a dependency loop, or None.
    """
    order, state = [], {}  # state: 1 = being visited, 2 = done

    def visit(node_id):
        if state.get(node_id) == 2 or node_id not in prompt.nodes:
            return None
        if state.get(node_id) == 1:
            return node_id
        state[node_id] = 1
        for source, _ in links_of(prompt.nodes[node_id]):
            loop = visit(source)
            if loop is not None:
                return loop
        state[node_id] = 2
        order.append(node_id)
        return None

    for output_id in output_ids:
        loop = visit(output_id)
        if loop is not None:
            return order, loop
    return order, None
