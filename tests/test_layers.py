"""The layers import only what docs/architecture.md says they may:
- core/ is the engine and knows nothing of ComfyUI or of the node layer: no module under it
  imports comfy, folder_paths or nodes. The node layer passes what it knows.
- workflow_runner/ speaks ComfyUI's node protocol without ComfyUI: it imports no ComfyUI module
  and nothing else of LoRA Lab (core/, nodes/); what it runs is the registry it is given."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = ("comfy", "folder_paths", "comfy_extras", "nodes", "execution", "server")


def imported(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def offenders(layer, forbidden_siblings):
    """Imports under ROOT/layer of a ComfyUI module (absolute), or of one of LoRA Lab's own
    top-level packages in forbidden_siblings (relative, out of the layer: from ..nodes)."""
    folder, found = os.path.join(ROOT, layer), []
    for root, _, names in os.walk(folder):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(root, name)
            depth = len(os.path.relpath(path, folder).split(os.sep))  # layer/x.py: 1
            for module, level in imported(path):
                top = module.split(".")[0]
                if level == 0 and top in COMFYUI + ("loralab",):
                    found.append(f"{path}: import {module}")
                if level > depth and top in forbidden_siblings:
                    found.append(f"{path}: from {'.' * level}{module}")
    return found


def test_core_imports_neither_comfyui_nor_the_nodes():
    found = offenders("core", ("nodes", "workflow_runner", "cli"))
    assert not found, "\n".join(found)


def test_the_workflow_runner_imports_neither_comfyui_nor_the_rest_of_loralab():
    found = offenders("workflow_runner", ("core", "nodes", "cli"))
    assert not found, "\n".join(found)


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    layer = tmp_path / "workflow_runner"
    (layer / "sub").mkdir(parents=True)
    (layer / "sub" / "x.py").write_text("from ...nodes import comfy_adapter\nimport folder_paths\n"
                                        "from ..plan import needed_nodes\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert offenders("workflow_runner", ("nodes",)) == [
        f"{layer / 'sub' / 'x.py'}: from ...nodes", f"{layer / 'sub' / 'x.py'}: import folder_paths"]
