"""Whether a later node of the graph uses the base model a node was given. ComfyUI hands a node
the prompt it runs (the PROMPT and UNIQUE_ID hidden inputs; the headless runner gives the same),
API format: {node id: {"class_type", "inputs"}}, a link being [source id, output index]."""

HIDDEN_INPUTS = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}


def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def used_later(prompt, node_id, input_name, ran=()):
    """True when another node takes the same output as this node's `input_name` and will run
    after this one: it needs this node's outputs (directly or through others), or it has not run
    yet (`ran`: the ids of the nodes that used this value so far, besides this node's own
    inputs' nodes; ComfyUI picks the order of nodes that do not depend on each other). A graph that cannot be read (no prompt, a node not in it)
    keeps the model: True."""
    inputs = {str(key): node.get("inputs") or {} for key, node in prompt.items()
              if isinstance(node, dict)} if isinstance(prompt, dict) else {}
    source = inputs.get(str(node_id), {}).get(input_name)
    if not _is_link(source):
        return True
    consumers, needs = {}, {}  # node id -> the ids of the nodes linked to its outputs / inputs
    for other_id, values in inputs.items():
        for value in values.values():
            if _is_link(value):
                consumers.setdefault(str(value[0]), set()).add(other_id)
                needs.setdefault(other_id, set()).add(str(value[0]))
    after = _reached(consumers, str(node_id))   # every node that needs this one: runs after it
    ran = {str(other) for other in ran} | _reached(needs, str(node_id)) | {str(node_id)}
    sharing = {other for other, values in inputs.items() if other != str(node_id) and any(
        _is_link(value) and [str(value[0]), value[1]] == [str(source[0]), source[1]]
        for value in values.values())}
    return any(other in after or other not in ran for other in sharing)


def _reached(edges, start):
    found, waiting = set(), [start]
    while waiting:
        for node in edges.get(waiting.pop(), ()):
            if node not in found:
                found.add(node)
                waiting.append(node)
    return found
