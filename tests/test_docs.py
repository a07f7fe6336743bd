"""The README and docs/ say what the code does: docs/config.md is the schema's (regenerated, not
edited), the README's config for a user's own pictures is one the schema accepts, and the README
gives the install and test commands that CI runs, in a first screen that stays short."""
import json
import os
import re

import jsonschema

from loralab.core.config import SCHEMA, resolve
from loralab.core.config.reference import markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_docs_config_md_is_generated_from_the_schema():
    assert read("docs/config.md") == markdown(), (
        "docs/config.md is stale: python -m loralab.core.config.reference > docs/config.md")


def test_the_reference_names_every_setting_with_its_default():
    text = markdown()
    for section, spec in SCHEMA["properties"].items():
        for key, setting in spec.get("properties", {}).items():
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{key}` |"))
            if setting.get("default") is not None:
                assert f"`{json.dumps(setting['default'])}`" in row, row


def test_the_readmes_own_pictures_config_is_valid():
    readme = read("README.md")
    block = re.search(r"\*\*Your own pictures\.\*\*.*?```json\n(.*?)```", readme, re.S).group(1)
    config = json.loads(block)
    jsonschema.validate(config, SCHEMA)
    resolved = resolve(config)  # defaults filled, as loralab train does before it loads a model
    assert resolved["dataset"]["folder"] == "my_pictures" and resolved["dataset"]["trigger_word"]
    assert len(block.strip().splitlines()) <= 10


def test_the_readme_gives_cis_install_and_test_commands_and_stays_short():
    readme, ci = read("README.md"), read(".ci/run")
    install = re.search(r'pip_in \.venv-ci install (torch==[\d.]+ -e "\.\[test\]")', ci).group(1)
    assert f"pip install {install}\npython -m pytest -q\n" in readme
    assert "timed \"tests (python -m pytest -q)\" python -m pytest -q" in ci
    assert len(readme) <= 12_000, len(readme)
    first_screen = readme[:readme.index("\n## ")]
    for step in ("git clone", "custom_nodes", "requirements.txt", "workflows/quickstart.ui.json",
                 "loralab run quickstart", "my_pictures/"):
        assert step in first_screen, step
