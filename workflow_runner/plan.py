"""Which nodes run and in what order. A run is for its output nodes (OUTPUT_NODE classes of the
registry): they and what they need run, dependencies first. Every other node, of any type
(ComfyUI's own, another pack's, a stray one of ours), is skipped and named. A node type is
known by being in the registry, never by a list of names: one that is absent only ComfyUI can
run, and that stops the run only when an output needs it (validate.py says so)."""

from .formats import ApiPrompt, is_link
from .node_types import is_output_node

NOT_HERE = "only ComfyUI can run it (no such node here); no output here needs it"
NOT_NEEDED = "no output node needs it"
VISITING, DONE = 1, 2  # needed_nodes' walk


def links_of(node: dict) -> list:
    """The (source_id, slot) pairs feeding a node."""
    return [(value[0], value[1]) for value in node["inputs"].values() if is_link(value)]


def output_nodes(prompt: ApiPrompt, registry: dict) -> list:
    """The ids of the nodes a run is for: those whose registry class is an OUTPUT_NODE."""
    return [node_id for node_id, node in prompt.nodes.items()
            if node["class_type"] in registry and is_output_node(registry[node["class_type"]])]


def skip_unneeded(prompt: ApiPrompt, registry: dict) -> None:
    """List in prompt.skipped every node that no output node needs, with why."""
    needed = set(needed_nodes(prompt, output_nodes(prompt, registry))[0])
    for node_id, node in prompt.nodes.items():
        if node_id not in needed:
            reason = NOT_NEEDED if node["class_type"] in registry else NOT_HERE
            prompt.skipped.append({"node_id": node_id, "title": prompt.title(node_id),
                                   "class_type": node["class_type"], "reason": reason})


def needed_nodes(prompt: ApiPrompt, output_ids: list) -> tuple:
    """The output nodes and every node they need, dependencies first (each once).

    Returns (order, loop): loop is a node id on a dependency loop, or None; order still holds
    every node the outputs reach. A depth-first walk with its own stack, so a chain of any
    length fits (no Python recursion).
    """
    order, state, loop = [], {}, None  # state: VISITING while on the stack, then DONE
    for output_id in output_ids:
        if output_id in state or output_id not in prompt.nodes:
            continue
        state[output_id] = VISITING
        stack = [(output_id, iter(links_of(prompt.nodes[output_id])))]
        while stack:
            node_id, sources = stack[-1]
            source = next(sources, None)
            if source is None:  # every source of node_id is placed: place it
                stack.pop()
                state[node_id] = DONE
                order.append(node_id)
                continue
            source_id = source[0]
            if source_id not in prompt.nodes or state.get(source_id) == DONE:
                continue  # a missing source is validate's to name
            if state.get(source_id) == VISITING:
                loop = loop or source_id
                continue
            state[source_id] = VISITING
            stack.append((source_id, iter(links_of(prompt.nodes[source_id]))))
    return order, loop

