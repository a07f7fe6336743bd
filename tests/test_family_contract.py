"""Every model family is a ModelFamily (core/families/base.py), found by the registry from its
folder: it overrides the contract's methods with the same parameters, fills the data the config
loader, the coach and the CLI read instead of naming a family, and nothing outside
core/families/<name>/ names it."""
import inspect
import os

import pytest

from loralab.core.families import NAMES, get_family
from loralab.core.families.base import MemoryModel, ModelFamily

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = [name for name, value in vars(ModelFamily).items()
           if inspect.isfunction(value) and not name.startswith("_")]
# What a family must implement itself: the base raises NotImplementedError for these.
# (trainable_model, to_device, free_text_encoders and remove_lora have the transformer
# pipelines' defaults, which FLUX.1 and the UNets override.)
OWN = ["load", "encoders_to_device", "lora_to_diffusers", "lora_to_kohya", "encode_prompts",
       "encode_image", "training_loss", "generate", "make_tiny"]


def test_the_transformer_defaults_are_overridden_where_the_pipeline_differs():
    for name in ("flux", "sd15", "sdxl"):
        for member in ("to_device", "free_text_encoders", "remove_lora"):
            assert getattr(type(get_family(name)), member) is not getattr(ModelFamily, member), (name, member)


@pytest.mark.parametrize("name", NAMES)
def test_family_subclasses_the_contract(name):
    family = get_family(name)
    assert isinstance(family, ModelFamily) and family.name == name
    assert os.path.isdir(os.path.join(ROOT, "core", "families", name)), "a family is one folder"
    for member in METHODS:
        wanted = list(inspect.signature(getattr(ModelFamily, member)).parameters)[1:]  # less self
        given = list(inspect.signature(getattr(family, member)).parameters)
        assert given[:len(wanted)] == wanted, f"{name}.{member}{tuple(given)} != {tuple(wanted)}"
    for member in OWN:
        assert getattr(type(family), member) is not getattr(ModelFamily, member), f"{name} lacks {member}"


@pytest.mark.parametrize("name", NAMES)
def test_family_carries_its_knowledge(name):
    family = get_family(name)
    assert family.title and family.pipeline_classes and isinstance(family.LORA_TARGETS, str)
    assert set(family.required_files) <= set(family.single_files) and family.single_files_text
    assert family.SIZE_MULTIPLE % 8 == 0 and family.default_save_format in ("diffusers", "kohya")
    assert set(family.KOHYA_METADATA) == {"ss_base_model_version", "ss_network_module"}
    assert "tiny" in family.tiny_presets
    assert isinstance(family.memory, MemoryModel) and family.memory.quantize_modes[0] == "none"
    for dotted in family.config_defaults:
        section, key = dotted.split(".")
        from loralab.core.config import SCHEMA

        assert key in SCHEMA["properties"][section]["properties"], f"{name}: {dotted} is no setting"
    if not family.text_encoder_lora:
        with pytest.raises(ValueError, match="network.text_encoder"):
            family.text_encoders(None)


def test_each_pipeline_class_belongs_to_one_family():
    owners = [cls for name in NAMES for cls in get_family(name).pipeline_classes]
    assert len(owners) == len(set(owners))


def test_the_defaults_apply_only_where_the_config_is_silent(tmp_path):
    from loralab.core.config import resolve

    for name in NAMES:
        family = get_family(name)
        config = {"model": {"family": name, "path": str(tmp_path)}, "dataset": {"folder": str(tmp_path)}}
        resolved = resolve(config)
        assert resolved["save"]["format"] == family.default_save_format
        for dotted, value in family.config_defaults.items():
            section, key = dotted.split(".")
            assert resolved[section][key] == value
        if family.config_defaults:
            dotted = next(iter(family.config_defaults))
            section, key = dotted.split(".")
            given = resolve({**config, section: {**config.get(section, {}), key: resolved[section][key]}})
            assert given[section][key] == resolved[section][key]


# Outside core/families/<name>/ a family's name may stand in user-facing text (docstrings,
# comments, descriptions and help that say "FLUX.1" or "SDXL"), never as a string in code.
def _code_strings(path):
    """(line, text) of each string literal in a Python file that is not a docstring."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def family_names_in_code(paths):
    found = []
    for path in paths:
        found += [f"{os.path.relpath(path, ROOT)}:{line}: {text!r}"
                  for line, text in _code_strings(path) if text in NAMES]
    return sorted(found)


def _python_files(*folders):
    return [os.path.join(root, file) for folder in folders
            for root, _, files in os.walk(os.path.join(ROOT, folder)) for file in files if file.endswith(".py")]


def test_nothing_outside_the_families_names_a_family():
    paths = [path for path in _python_files("core", "nodes") + [os.path.join(ROOT, "cli.py")]
             if not os.path.relpath(path, ROOT).startswith(os.path.join("core", "families", ""))]
    found = family_names_in_code(paths)
    assert not found, "\n".join(found)


def test_the_name_check_sees_one(tmp_path):
    path = tmp_path / "y.py"
    path.write_text('"""if family == "flux": a docstring may say it."""\n# so may a comment: "sdxl"\n'
                    f'MULTIPLE = {{"{NAMES[0]}": 16}}\nif family != "{NAMES[-1]}":\n    pass\n')
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in family_names_in_code([str(path)])] == ["3", "4"]


# The one shared base a family folder may import: SDXL and SD1.5 are one UNetFamily (unet/).
SHARED_BASES = {"sdxl": {"unet"}, "sd15": {"unet"}}
FAMILIES_DIR = os.path.join(ROOT, "core", "families")


def cross_family_imports(root=ROOT):
    """(file, line, imported module) of every import from one folder of core/families/ into
    another (parts/, the machinery families share, is a folder no family owns and imports none),
    read by AST as tests/test_layers.py reads them."""
    from test_layers import imported

    base = os.path.join(root, "core", "families")
    folders = {d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "__init__.py"))}
    found = []
    for folder in sorted(folders):
        for dirpath, _, files in os.walk(os.path.join(base, folder)):
            for file in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, file)
                for line, module, ours, _ in imported(path, root):
                    parts = module.split(".")
                    if not ours or parts[:2] != ["core", "families"] or len(parts) < 3:
                        continue
                    other = parts[2]
                    if other in folders and other != folder and other != "parts" and \
                            other not in SHARED_BASES.get(folder, ()):
                        found.append((os.path.relpath(path, root), line, module))
    return found


def test_family_folders_do_not_import_each_other():
    """A new family is one new folder: what several families use lives in core/families/parts/."""
    assert cross_family_imports() == []


def test_the_cross_family_check_sees_one(tmp_path):
    for folder, text in (("alpha", "from ..beta.files import x\n"), ("beta", "x = 1\n"),
                         ("parts", "from ..alpha import y\n")):
        os.makedirs(tmp_path / "core" / "families" / folder)
        (tmp_path / "core" / "families" / folder / "__init__.py").write_text("")
        (tmp_path / "core" / "families" / folder / "files.py").write_text(text)
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "families" / "__init__.py").write_text("")
    found = cross_family_imports(str(tmp_path))
    assert [(path, module) for path, _, module in found] == [
        (os.path.join("core", "families", "alpha", "files.py"), "core.families.beta.files"),
        (os.path.join("core", "families", "parts", "files.py"), "core.families.alpha")]
