"""The exceptions a workflow run raises, and how a problem names the node it is about."""


def describe_node(node_id, title, class_type) -> str:
    """`node 5 'Train my LoRA' (LoRALabTrainLoRA)`; the class is left out when it is the title."""
    if title and class_type and title != class_type:
        return f"node {node_id} '{title}' ({class_type})"
    if not (title or class_type):
        return f"node {node_id}"
    return f"node {node_id} '{title or class_type}'"


def found(value, limit=60) -> str:
    """What a JSON value is, for a message: `a number 5`, `a string 'abc...'`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kind = {int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    return f"{kind} {shown(value, limit)}"


def shown(value, limit=60) -> str:
    """repr(value), cut short (a string's length said) when longer than `limit`."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[:limit - 3] + "..." + (f" ({len(value)} characters)" if isinstance(value, str) else "")


def make_problem(node_id, title, input_name, message, class_type=None) -> dict:
    """One validation problem; node_id/title/input are None when the problem is not about one."""
    return {"node_id": node_id, "title": title, "input": input_name, "message": message,
            "class_type": class_type}


def format_problem(problem: dict) -> str:
    where = []
    if problem["node_id"] is not None:
        where.append(describe_node(problem["node_id"], problem["title"], problem.get("class_type")))
    if problem["input"] is not None:
        where.append(f"input '{problem['input']}'")
    return (", ".join(where) + ": " if where else "") + problem["message"]


class WorkflowError(ValueError):
    """A workflow that cannot run. The message lists every problem, one per line."""

    def __init__(self, problems: list[dict]):
        self.problems = list(problems)
        super().__init__("\n".join(format_problem(p) for p in self.problems))


class WorkflowInterrupted(RuntimeError):
    """A stop was requested (first Ctrl+C); the run ended between two nodes."""

    def __init__(self, completed: list[str], next_node: str):
        self.completed = list(completed)
        self.next_node = next_node
        super().__init__(
            f"workflow stopped on request after {len(completed)} node(s); "
            f"{next_node} and the nodes after it did not run"
        )


class NodeFailed(RuntimeError):
    """A node raised (the original exception is the __cause__) or returned something unusable."""

    def __init__(self, node_id, title, class_type, reason: str):
        self.node_id, self.title, self.class_type = node_id, title, class_type
        super().__init__(f"{describe_node(node_id, title, class_type)} failed: {reason}")
