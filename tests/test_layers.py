"""The layers import only what docs/architecture.md says they may. The order is read from the
doc's "Layers" list, top to bottom, and every import of every module (`import ...` and
`from ... import ...`, relative or absolute, at any depth) is checked against it:
- a module imports only its own layer or the layers listed below it (within core/, its own room
  or the rooms below it);
- core/ is the engine and knows nothing of ComfyUI or of the node layer: no module under it
  imports comfy, folder_paths or nodes. The node layer passes what it knows.
- workflow_runner/ speaks ComfyUI's node protocol without ComfyUI: it imports no ComfyUI module
  and nothing else of LoRA Lab (core/, nodes/); what it runs is the registry it is given."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = ("comfy", "folder_paths", "comfy_extras", "nodes", "execution", "server")
PACKAGE = "loralab"  # the repository root is the import package

# Imports that run up today and that another change in flight moves down; each names who removes
# it. Nothing else may be added here.
PENDING = {}


def documented_order(root=None):
    """(top-level layers, core's rooms), each top to bottom, from docs/architecture.md's list."""
    with open(os.path.join(root or ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"## Layers\n.*?```\n(.*?)```", text, re.S).group(1)
    top, rooms = [], []
    for line in block.splitlines():
        name = re.match(r"( *)(\S+)", line)
        if not name or (name.group(1) and not name.group(1) == "  "):
            continue  # a wrapped description
        if name.group(1):
            rooms.append(name.group(2))
        else:
            top.append(name.group(2).rstrip("/").removesuffix(".py"))
    return top, rooms


def module_name(path, root):
    """The dotted name of a file under root, without the package prefix: core.families.base."""
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted, root):
    base = os.path.join(root, *dotted.split(".")) if dotted else root
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def imported(path, root):
    """(line, dotted module name under the package or an outside module name, is_ours) of every
    import in a file; `from X import a` names X.a where that is a module of ours."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module_name(path, root).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]
    package = [p for p in package if p]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                ours = alias.name == PACKAGE or alias.name.startswith(PACKAGE + ".")
                yield node.lineno, alias.name.removeprefix(PACKAGE).lstrip("."), ours, 0
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0:
                ours = module == PACKAGE or module.startswith(PACKAGE + ".")
                base = module.removeprefix(PACKAGE).lstrip(".") if ours else module
            else:
                ours = True
                base = ".".join(package[:len(package) - (node.level - 1)] + ([module] if module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                yield node.lineno, full if ours and _is_module(full, root) else base, ours, node.level


def layer_of(dotted, top, rooms):
    """(index in the top-level order, index in core's rooms or None) of one of our modules."""
    parts = dotted.split(".") if dotted else ["__init__"]
    if parts[0] != "core":
        return top.index(parts[0]), None
    room = parts[1] if len(parts) > 1 else "dtypes"  # core/__init__.py stands with dtypes
    return top.index("core"), rooms.index(room)


def upward_imports(root=None, pending=PENDING):
    """'file:line: imports X (layer a above layer b)' for every import against the order."""
    root = root or ROOT
    top, rooms = documented_order(root)
    found = []
    for layer in top:
        start = os.path.join(root, layer + ("" if os.path.isdir(os.path.join(root, layer)) else ".py"))
        if not os.path.exists(start):
            continue
        paths = [start] if start.endswith(".py") else [
            os.path.join(folder, name) for folder, _, names in os.walk(start) for name in names if name.endswith(".py")]
        for path in paths:
            own = module_name(path, root)
            mine = layer_of(own, top, rooms)
            for line, target, ours, _ in imported(path, root):
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                if not ours or (relative, target) in pending:
                    continue
                theirs = layer_of(target, top, rooms)
                if theirs[0] < mine[0] or (theirs[0] == mine[0] and mine[1] is not None and theirs[1] < mine[1]):
                    found.append(f"{relative}:{line}: imports {target}, a layer above")
    return found


def test_every_import_runs_down_the_documented_layers():
    found = upward_imports()
    assert not found, "\n".join(found)


def test_the_order_names_every_layer_there_is():
    top, rooms = documented_order()
    assert top[:5] == ["__init__", "cli", "nodes", "workflow_runner", "core"]
    there = {name.removesuffix(".py") for name in os.listdir(os.path.join(ROOT, "core"))
             if not name.startswith(("_", ".")) and (name.endswith(".py") or os.path.isdir(os.path.join(ROOT, "core", name)))}
    there.discard("__pycache__")
    assert there <= set(rooms), f"not in docs/architecture.md's layer list: {there - set(rooms)}"
    # io is the floor of what writes files; only dtypes and core/__init__.py (UserError) are below it
    assert rooms[-1] == "dtypes" and rooms.index("io") > rooms.index("lora")
    # the coach reads the demo's scores for the run summary; the demo draws with the lower layers
    assert rooms.index("coach") < rooms.index("demo") < min(rooms.index(r) for r in ("dataset", "families", "sampling"))


def test_the_check_sees_an_upward_import(tmp_path):
    """A copy of the doc and three modules: one imports down (fine), one up in core's rooms, one
    from the engine up to the nodes; both upward ones are named by file and line."""
    (tmp_path / "docs").mkdir()
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        (tmp_path / "docs" / "architecture.md").write_text(f.read())
    for folder in ("core/lora", "core/trainer", "core/io", "nodes"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "io" / "atomic.py").write_text("import os\n")
    (tmp_path / "core" / "trainer" / "loop.py").write_text("from ..lora import x\nfrom ..io.atomic import y\n")
    (tmp_path / "core" / "lora" / "files.py").write_text("import json\n\nfrom ..trainer import loop\n")
    (tmp_path / "core" / "io" / "deep.py").write_text("import loralab.nodes.values\n")
    assert sorted(upward_imports(str(tmp_path), pending={})) == [
        "core/io/deep.py:1: imports nodes.values, a layer above",
        "core/lora/files.py:3: imports core.trainer.loop, a layer above"]


# -- ComfyUI and the workflow runner ---------------------------------------------------------------


def offenders(layer, forbidden_siblings):
    """Imports under ROOT/layer of a ComfyUI module (absolute), or of one of LoRA Lab's own
    top-level packages in forbidden_siblings (relative, out of the layer: from ..nodes)."""
    folder, found = os.path.join(ROOT, layer), []
    for root, _, names in os.walk(folder):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(root, name)
            depth = len(os.path.relpath(path, folder).split(os.sep))  # layer/x.py: 1
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    pairs = [(alias.name, 0) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    pairs = [(node.module or "", node.level)]
                else:
                    continue
                for module, level in pairs:
                    top = module.split(".")[0]
                    if level == 0 and top in COMFYUI + (PACKAGE,):
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
