"""core/ is the engine and knows nothing of ComfyUI or of the node layer (docs/architecture.md):
no module under it imports comfy, folder_paths or nodes. The node layer passes what it knows."""
import ast
import os

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core")
FORBIDDEN = ("comfy", "folder_paths", "comfy_extras", "nodes", "execution", "server")


def imported(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def test_core_imports_neither_comfyui_nor_the_nodes():
    offenders = []
    for root, _, names in os.walk(CORE):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(root, name)
            depth = len(os.path.relpath(path, CORE).split(os.sep))  # core/x.py: 1
            for module, level in imported(path):
                top = module.split(".")[0]
                if level == 0 and top in FORBIDDEN:
                    offenders.append(f"{path}: import {module}")
                if level > depth and top == "nodes":  # from ..nodes (relative, out of core/)
                    offenders.append(f"{path}: from {'.' * level}{module}")
    assert not offenders, "\n".join(offenders)
