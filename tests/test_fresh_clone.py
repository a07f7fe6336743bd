"""A fresh clone with nothing beside it: what git would hand a newcomer (tracked files, and new
ones not ignored) is all the docs link to, and `pip install .` of just those files gives a
`loralab` whose shipped quickstart runs by name from any folder."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))
                              if name.endswith(".md"))


def clone_files() -> list:
    """The repository's files as a clone would have them, relative to ROOT."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: what a clone holds is unknown")
    return [path for path in listed.decode().split("\0")
            if path and os.path.isfile(os.path.join(ROOT, path))]


# -- links ------------------------------------------------------------------------------------

CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.S | re.M)  # no links are read inside code
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:: not a file of ours


def links(text) -> list:
    text = CODE.sub("", text)
    return INLINE_LINK.findall(text) + REFERENCE.findall(text)


def anchors(text) -> set:
    """The #anchors GitHub gives a Markdown file's headings: the text as shown, lowercased,
    punctuation but - and _ dropped, spaces as -; a repeated one gets -1, -2, ..."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", CODE.sub("", text), re.M):
        shown = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("*", "").replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", shown.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def read(path) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def broken_links(doc, text, files) -> list:
    """Why each relative link of `doc` (whose text is `text`) fails: outside the repository,
    no such file or folder in a clone, or no such heading."""
    problems = []
    for target in links(text):
        if SCHEME.match(target):
            continue
        path, _, anchor = unquote(target).partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if resolved == ".." or resolved.startswith(".." + os.sep) or os.path.isabs(path):
            problems.append(f"{doc}: {target} points outside the repository")
        elif resolved not in files and not any(f.startswith(resolved + os.sep) for f in files):
            problems.append(f"{doc}: {target}: no {resolved} in a clone")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(
                text if resolved == doc else read(resolved)):
            problems.append(f"{doc}: {target}: {resolved} has no heading #{anchor}")
    return problems


def test_every_relative_link_in_readme_and_docs_resolves_inside_the_repository():
    files = set(clone_files())
    problems = []
    for doc in DOCS:
        problems += broken_links(doc, read(doc), files)
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_each_kind_of_broken_link():
    files = {"README.md", "docs/a.md", "workflows/q.json"}
    text = ("[ok](docs/a.md) [dir](workflows/) [web](https://x.org/a) [here](#intro)\n"
            "# Intro\n## Run folder **(contract)**\n"
            "[out](../shared/GUIDE.md) [gone](docs/b.md) ![img](docs/p.png) [bad](#nope)\n"
            "[ref]: docs/c.md\n```\n[in code](docs/z.md)\n```\n")
    assert broken_links("README.md", text, files) == [
        "README.md: ../shared/GUIDE.md points outside the repository",
        "README.md: docs/b.md: no docs/b.md in a clone",
        "README.md: docs/p.png: no docs/p.png in a clone",
        "README.md: #nope: README.md has no heading #nope",
        "README.md: docs/c.md: no docs/c.md in a clone"]
    assert anchors(text) == {"intro", "run-folder-contract"}


# -- pip install . -------------------------------------------------------------------------------

def make_venv(folder) -> str:
    """A new venv whose own site-packages is empty but that sees this environment's libraries
    (torch, diffusers, setuptools) through a .pth line. Not --system-site-packages: from a venv's
    Python that shares the base interpreter's packages, not this venv's. A plain path line adds
    the folder without running its .pth files, so this checkout's editable install stays out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = os.path.join(folder, "bin", "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(own, "libraries.pth"), "w", encoding="utf-8") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def shrink_installed_quickstart(python, env):
    """The installed quickstart.json with the steps and the grid made tiny, so this stays quick:
    the shipped sizes are trained by test_workflows.py's quickstart test."""
    path = subprocess.run([python, "-c", "import loralab, os; print(os.path.join("
                           "os.path.dirname(loralab.__file__), 'workflows', 'quickstart.json'))"],
                          capture_output=True, text=True, check=True, env=env).stdout.strip()
    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    for node in workflow.values():
        if node["class_type"] == "LoRALabConfigureLoRA":
            node["inputs"].update(steps=2, sample_every=0, performance_log_every=1)
        if node["class_type"] == "LoRALabSampleGrid":
            node["inputs"].update(prompts="a photo of [trigger]", strengths="0,1", steps=1)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(workflow, handle)


def test_pip_install_of_a_clone_gives_a_loralab_that_runs_the_quickstart_by_name(tmp_path):
    clone = tmp_path / "clone"
    for path in clone_files():
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), clone / path)
    python = make_venv(tmp_path / "venv")
    installed = subprocess.run(
        # --ignore-installed: this checkout's editable install, seen through the .pth, stays
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed",
         "--no-build-isolation", "--no-index", "--quiet", str(clone)],
        capture_output=True, text=True, timeout=240)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    shutil.rmtree(clone)  # a copy was installed, not a link: nothing may need the clone now

    # as a user's shell has it: not a developer's PYTHONPATH to a checkout
    env = {k: v for k, v in os.environ.items() if k not in ("LORALAB_COMFYUI", "PYTHONPATH")}
    where = subprocess.run([python, "-c", "import loralab.workflow_runner as w; print(w.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    site = os.path.realpath(tmp_path / "venv")
    assert where.returncode == 0, where.stderr
    assert os.path.realpath(where.stdout.strip()).startswith(site + os.sep), where.stdout
    shrink_installed_quickstart(python, env)  # env: else a PYTHONPATH's checkout is shrunk

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "loralab"), "run", "quickstart"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lora = elsewhere / "output" / "loras" / "loralab" / "quickstart_00001.safetensors"
    assert lora.is_file() and f"node 5 'Save LoRA to loras': {lora}" in done.stdout
    assert (elsewhere / "output" / "quickstart" / "grid_00001.png").is_file()
    assert "finished: step 2 of 2" in done.stdout
