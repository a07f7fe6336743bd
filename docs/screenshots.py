"""The README's pictures, taken from the real thing: a ComfyUI server with this pack in its
custom_nodes (a temporary --base-directory, --cpu), its page in headless Chromium (Playwright),
the quickstart graph (workflows/quickstart.ui.json) loaded as a user opens it, queued, and run.

Writes into docs/images/:
  quickstart-graph.png  the graph in ComfyUI after the run, the grid in its preview node
  quickstart-grid.png   the grid SampleGrid saved (rows: prompts, columns: LoRA strengths 0, 0.5, 1)
  NAME.png              with --graphs: each other shipped UI workflow as ComfyUI's page opens it,
                        not run; the script fails if the page lacks a node type of the file or
                        shows a LoRA Lab widget with another value than the file's

    python docs/screenshots.py --comfyui ../shared/comfyui --python PATH/TO/COMFYUI/VENV/bin/python \
        [--chromium /usr/bin/chromium] [--no-run | --graphs]

Needs Playwright and Pillow in the running Python (pip install playwright pillow) and a Chromium
(Debian: apt-get install chromium); the quickstart takes minutes on a CPU.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(REPOSITORY, "workflows", "quickstart.ui.json")
IMAGES = os.path.join(REPOSITORY, "docs", "images")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEW = {"width": 1600, "height": 1000}


def start_comfyui(source, python, base, log):
    """ComfyUI on a free local port with `base` as its base directory; its URL once it serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", base, "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch"]
    process = subprocess.Popen(command, cwd=source, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ComfyUI exited; see {log.name}")
        try:
            urllib.request.urlopen(url + "/object_info/LoRALabTrainLoRA", timeout=5).read()
            return process, url
        except OSError:
            time.sleep(2)
    process.kill()
    raise SystemExit(f"ComfyUI did not start in 300 s; see {log.name}")


# The picture shows the graph, not the editor's aids: no minimap, no per-node source badges, the
# whole graph in view (ComfyUI's own commands and settings, as a user would set them).
TIDY = """async () => {
    const {command, setting} = window.app.extensionManager;
    await setting.set('Comfy.NodeBadge.NodeSourceBadgeMode', 'None');
    await setting.set('Comfy.Minimap.Visible', false);
    await setting.set('Comfy.TutorialCompleted', true);
    await command.execute('Comfy.Canvas.FitView');
}"""


def open_graph(page, url, workflow):
    """The ComfyUI page with `workflow` loaded (app.loadGraphData, as opening the file does)."""
    page.goto(url, wait_until="networkidle")
    page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
    page.evaluate("(graph) => window.app.loadGraphData(graph)", workflow)
    page.evaluate(TIDY)
    page.wait_for_timeout(3000)
    page.keyboard.press("Escape")  # the templates dialog a first start shows
    page.wait_for_timeout(1000)


# What the page made of the file: node types it has no class for, and LoRA Lab widgets whose value
# differs from the file's widgets_values (the order ComfyUI's frontend maps them in)
OPENED = """(file) => {
    const known = window.LiteGraph.registered_node_types;
    const missing = window.app.graph.nodes.filter(n => !(n.type in known)).map(n => n.type);
    const differ = [];
    for (const saved of file.nodes) {
        if (!saved.type.startsWith('LoRALab')) continue;
        const node = window.app.graph.getNodeById(saved.id);
        const shown = (node.widgets || []).map(w => w.value);
        (saved.widgets_values || []).forEach((value, i) => {
            if (JSON.stringify(shown[i]) !== JSON.stringify(value))
                differ.push(`${saved.type} #${saved.id} widget ${i}: file ${JSON.stringify(value)}, page ${JSON.stringify(shown[i])}`);
        });
    }
    return {missing, differ};
}"""


# The pictures are taken zoomed out to fit: draw the nodes' text there too (the editor simplifies
# below 60% by default)
SHARP = """async () => {
    await window.app.extensionManager.setting.set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.1);
}"""


def model_files(base):
    """Empty files named as the shipped workflows' model widgets, in every model folder of
    ComfyUI's `base`: the page shows the graph as on a machine that has the models, not the
    missing-file errors (the graphs are opened, not run)."""
    names = set()
    folder = os.path.dirname(WORKFLOW)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = json.load(f)
        for node in text.get("nodes", []):
            names |= {v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")}
    for kind in ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras"):
        os.makedirs(os.path.join(base, "models", kind), exist_ok=True)
        for name in names:
            open(os.path.join(base, "models", kind, name), "w").close()


def graph_pictures(page, url):
    """Each shipped UI workflow but the quickstart, opened as a user opens it and checked
    (OPENED); a picture of each in docs/images. The problems found, one line each."""
    problems = []
    folder = os.path.dirname(WORKFLOW)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".ui.json") or name == os.path.basename(WORKFLOW):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            workflow = json.load(f)
        open_graph(page, url, workflow)
        page.evaluate(SHARP)
        page.wait_for_timeout(1000)
        opened = page.evaluate(OPENED, workflow)
        problems += [f"{name}: no node type {t} on the page" for t in opened["missing"]]
        problems += [f"{name}: {line}" for line in opened["differ"]]
        picture = os.path.join(IMAGES, name[:-len(".ui.json")] + ".png")
        page.screenshot(path=picture)
        small_png(picture)
        print(f"wrote {picture}")
    return problems


def queue_and_wait(page, base, timeout=3600):
    """Queues the loaded graph as the Queue button does; the grid PNG SampleGrid saved."""
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline = time.monotonic() + timeout
    output = os.path.join(base, "output")
    while time.monotonic() < deadline:
        grids = [os.path.join(folder, name) for folder, _, names in os.walk(output) for name in names
                 if name.startswith("grid") and name.endswith(".png")]
        if grids:
            page.wait_for_timeout(5000)  # the preview node shows it
            return grids[0]
        time.sleep(5)
    raise SystemExit(f"no grid in {output} after {timeout} s")


def small_png(path, colors=64):
    """Rewrites `path` with a palette of `colors` (the editor's flat colours survive; 195 KB -> 63 KB),
    to keep the repository small."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.path.join(REPOSITORY, "..", "shared", "comfyui"))
    parser.add_argument("--python", required=True, help="a Python that runs ComfyUI")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--no-run", action="store_true", help="only the graph, not run")
    parser.add_argument("--graphs", action="store_true",
                        help="the other shipped UI workflows instead, opened and checked, not run")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with open(WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    os.makedirs(IMAGES, exist_ok=True)
    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.symlink(REPOSITORY, os.path.join(base, "custom_nodes", "comfyui-loralab"))
        if args.graphs:
            model_files(base)
        with open(os.path.join(base, "comfyui.log"), "w") as log:
            process, url = start_comfyui(os.path.abspath(args.comfyui), args.python, base, log)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport=VIEW)
                if args.graphs:
                    problems = graph_pictures(page, url)
                    browser.close()
                    print("\n".join(problems) or "every workflow opened with its node types and widget values")
                    return 1 if problems else 0
                open_graph(page, url, workflow)
                if not args.no_run:
                    grid = queue_and_wait(page, base)
                    shutil.copy(grid, os.path.join(IMAGES, "quickstart-grid.png"))
                    small_png(os.path.join(IMAGES, "quickstart-grid.png"), colors=128)
                page.screenshot(path=os.path.join(IMAGES, "quickstart-graph.png"))
                small_png(os.path.join(IMAGES, "quickstart-graph.png"))
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=60)
            shutil.copy(os.path.join(base, "comfyui.log"), os.path.join(tempfile.gettempdir(),
                                                                       "loralab-screenshots-comfyui.log"))
    print(f"wrote {IMAGES}/quickstart-graph.png" + ("" if args.no_run else " and quickstart-grid.png"))


if __name__ == "__main__":
    sys.exit(main())
