"""`loralab`: run a workflow, train from a config, plan a dataset, build a tiny model, list runs."""
import argparse
import json
import os
import shlex
import sys

from .core.families import NAMES as FAMILY_NAMES  # the registry's list: nothing heavy loads


class Progress:
    """Prints training events: tqdm's step bar (rate, ETA, loss) on a terminal, plain lines
    otherwise (CI logs, pipes)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.bar = None

    def line(self, text):
        if self.bar is not None:
            self.bar.write(text, file=self.stream)  # printed above the bar, which is redrawn
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event):
        kind = event.get("type")
        if kind == "start":
            self.close()
            self.line(f"training steps {event['step'] + 1}..{event['steps']}")
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event["steps"], initial=event["step"], file=self.stream,
                                unit="step", dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
            self.bar.update(event["step"] - self.bar.n)
        elif kind == "log":
            self.line(f"step {event['step']}: loss {event['loss']:.4f}, lr {event['lr']:.2e}, "
                      f"{event['seconds_per_step']:.3f} s/step, peak RAM {event['cpu_peak_mb']:.0f} MiB"
                      + (f", GPU {event['gpu_peak_mb']:.0f} MiB" if event.get("gpu_peak_mb") else ""))
        elif kind == "plan":
            from .core.coach.run_plan import arithmetic

            self.line(f"plan: {arithmetic(event)}")
        elif kind == "checkpoint":
            self.line(f"saved {event['path']}")
        elif kind == "warning":
            self.line(f"warning: {event['message']}")
        elif kind in ("interrupted", "done"):
            self.close()  # the run's last line goes under the finished bar
            self.line(_describe(event))
        elif kind in ("status", "resume", "sample"):
            self.line(_describe(event))


def _describe(event):
    kind = event["type"]
    if kind == "resume":
        return f"resuming from step {event['step']}"
    if kind == "interrupted":
        return f"stopped at step {event['step']}; checkpoint {event['path']} (run again to resume)"
    if kind == "done":
        return f"{event['status']}: {event['path']}"
    if kind == "sample":
        return f"samples at step {event['step']}: {len(event['paths'])} image(s)"
    return event.get("message", "")


def cmd_train(args):
    from .core.config import load_config
    from .workflow_runner.interrupt import handle_ctrl_c, stop_requested

    config = load_config(args.config)  # a bad config is answered before torch loads
    from .core.trainer import train

    with handle_ctrl_c():
        result = train(config, on_event=Progress(), should_stop=stop_requested)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report for all processes
        from .core.coach.summary import run_summary
        from .core.runs import RunFolder

        print(run_summary(result, RunFolder(*os.path.split(result.run_folder)).read_metrics()))
        print(json.dumps({"status": result.status, "step": result.step, "lora": result.lora_path,
                          "run_folder": result.run_folder}))
    return 0 if result.status in ("finished", "already finished", "interrupted") else 1


def cmd_make_tiny_model(args):
    from .core.families import get_family

    family = get_family(args.family)
    if args.preset not in family.tiny_presets:
        print(f"--preset {args.preset}: {args.family} has {', '.join(family.tiny_presets)}", file=sys.stderr)
        return 2
    for path in family.make_tiny(args.folder, args.preset, args.single_file, args.comfyui):
        print(path)
    return 0


def _workflow_event_text(event):
    """One line for a run_workflow event (they carry "kind"; trainer events carry "type")."""
    node = f"node {event['node_id']} '{event['title']}'"
    if event["kind"] == "skipped":
        return f"skipped {node} ({event['class_type']}): {event['reason']}"
    if event["kind"] == "node_start":
        return f"[{event['index']}/{event['total']}] {node} ({event['class_type']})"
    return f"      done in {event['seconds']:.1f}s"


def _output_lines(result, node_titles):
    """What each output node returned: file paths, text, and the images it saved."""
    from .nodes.comfy_adapter import ui_file_path

    lines = []
    for node_id in dict.fromkeys([*result.outputs, *result.ui]):
        shown = [v if isinstance(v, str) else f"{type(v).__name__} {list(getattr(v, 'shape', []))}"
                 for v in result.outputs.get(node_id, ())]
        ui = result.ui.get(node_id) or {}
        shown += [text for text in ui.get("text", ()) if isinstance(text, str) and text not in shown]
        shown += [ui_file_path(image) for image in ui.get("images", ())]
        lines.append(f"node {node_id} '{node_titles[node_id]}': " + ", ".join(shown))
    return lines


def _registry(args):
    """LoRA Lab's nodes, plus ComfyUI's own when --comfyui (or LORALAB_COMFYUI) names a ComfyUI
    this Python can import; LoRA Lab's win where the names meet. Without ComfyUI its nodes are
    skipped and named. A ComfyUI named by the environment only may fail: the run goes on
    without it, saying why."""
    from .nodes import NODE_CLASS_MAPPINGS

    folder = args.comfyui or os.environ.get("LORALAB_COMFYUI")
    if not folder:
        return NODE_CLASS_MAPPINGS
    from .nodes.comfyui_nodes import ComfyUINotImportable, load_comfyui_nodes

    try:
        comfy_nodes = load_comfyui_nodes(folder, shlex.split(args.comfyui_args))
    except ComfyUINotImportable as error:
        if args.comfyui:
            raise
        print(f"note: LORALAB_COMFYUI is set, but {error} Its nodes are skipped.",
              file=sys.stderr)
        return NODE_CLASS_MAPPINGS
    return {**comfy_nodes, **NODE_CLASS_MAPPINGS}


def cmd_run(args):
    import traceback

    from .core import UserError  # loads nothing heavy: a refused workflow is answered before torch loads
    from .workflow_runner import NodeFailed, WorkflowInterrupted, run_workflow, to_api
    from .workflow_runner.interrupt import handle_ctrl_c, stop_requested
    from .nodes.events import listening

    if args.input_dir:  # where the workflow's dataset folders resolve (LoadDataset's folder)
        os.environ["LORALAB_INPUT"] = os.path.abspath(args.input_dir)
        args.comfyui_args += f" --input-directory {shlex.quote(os.environ['LORALAB_INPUT'])}"
    registry = _registry(args)  # first: ComfyUI must see its options before LoRA Lab's nodes ask
    progress, summaries = Progress(), []

    def on_node_event(event):  # TrainLoRA's summary is kept for the end, the rest printed now
        if event.get("type") == "summary":
            summaries.append(event["text"])
        else:
            progress(event)

    workflow = args.workflow  # a file, else the name of a shipped one: `loralab run quickstart`
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workflows",
                           workflow if workflow.endswith(".json") else workflow + ".json")
    if not os.path.isfile(workflow) and os.sep not in workflow and os.path.isfile(shipped):
        workflow = shipped
    prompt = to_api(workflow, registry)
    try:
        with handle_ctrl_c(), listening(on_node_event):
            result = run_workflow(prompt, registry,
                                  on_event=lambda event: progress.line(_workflow_event_text(event)))
    except WorkflowInterrupted as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    except NodeFailed as failed:
        # config, dataset, model, paths, memory: things the user fixes, not bugs to trace
        cause = getattr(failed.__cause__, "original", failed.__cause__)  # a node's NodeError
        user_error = isinstance(cause, (ValueError, UserError))
        if not user_error:
            traceback.print_exception(cause)
        print(f"error: {failed}", file=sys.stderr)
        return 2 if user_error else 1
    for text in summaries:
        print(text)
    titles = {node_id: prompt.title(node_id) for node_id in prompt.nodes}
    print("\n".join(_output_lines(result, titles)))
    print(f"finished in {result.seconds:.1f}s" + (" (stopped on request)" if stop_requested() else ""))
    return 130 if stop_requested() else 0


def cmd_plan(args):
    from .core.coach.plan import plan_report
    from .core.config import load_config, resolve

    config = load_config(args.config) if args.config else {}
    given = {("train", "steps"): args.steps, ("dataset", "repeats"): args.repeats,
             ("train", "batch_size"): args.batch_size, ("network", "linear"): args.linear,
             ("train", "lr"): args.lr, ("train", "optimizer"): args.optimizer,
             ("dataset", "resolution"): args.resolution, ("model", "path"): args.model,
             ("model", "transformer_path"): args.transformer, ("model", "family"): args.family}
    for (section, key), value in given.items():
        if value is not None:
            config.setdefault(section, {})[key] = value
    config.setdefault("dataset", {})["folder"] = args.dataset
    # validated like a training config, so a bad value is named; no model is needed to plan
    model = {"path": "-", **config.get("model", {})}
    if model["path"] == "-" and not model.get("transformer_path") and not model.get("checkpoint_path"):
        model.setdefault("family", FAMILY_NAMES[0])  # no model named: the estimate is the first family's
    config["model"] = {**model, "family": resolve({**config, "model": model})["model"]["family"]}
    print(plan_report(args.dataset, config))
    if args.vram is not None:
        print(fit_text(config, args.vram, named=bool(args.family or model["path"] != "-"
                                                     or model.get("transformer_path") or model.get("checkpoint_path"))))
    return 0


def fit_text(config, vram, named):
    """`plan --vram`: the named family's peak per quantize mode at 512 and 1024 px and its fit
    per card size; with no family named, every family's fit per card size."""
    from .core.config import with_defaults
    from .core.families import get_family
    from .core.memory import card_table, fit_report

    families = [config["model"]["family"]] if named else FAMILY_NAMES
    parts = []
    if named:
        resolutions = sorted({512, 1024, *config.get("dataset", {}).get("resolution", [])})
        parts.append(fit_report(with_defaults(config), int(vram * 2**30), resolutions))
    for family in families:
        sized = with_defaults({**config, "model": {**config["model"], "family": family}})
        parts.append(card_table(sized, yours_gb=vram))
        if sized["model"]["path"] == "-" and not sized["model"].get("transformer_path"):  # no model given
            parts += [card_table({**sized, "model": {**sized["model"], "path": size}}, yours_gb=vram)
                      for size in get_family(family).memory.other_sizes]
    return "\n".join(parts)


def cmd_runs_list(args):
    from .core.runs.history import find_runs, runs_table

    skipped = []  # damaged run folders, each "damaged: <file>: <why>"
    runs = find_runs(args.output_dir, skipped)
    print(runs_table(runs) if runs else f"no runs in {os.path.abspath(args.output_dir)}")
    print("\n".join(f"skipped {reason}" for reason in skipped), end="\n" if skipped else "")
    return 0


def cmd_runs_pin(args):
    from .core.runs import RunFolder
    from .core.runs.history import locate_run

    path = locate_run(args.run, args.output_dir)
    run = RunFolder(os.path.dirname(path), os.path.basename(path))
    try:
        pinned = run.pin(args.step, pinned=not args.unpin)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if run.pins_problem:
        print(f"warning: {run.pins_problem}", file=sys.stderr)
    print(f"{'unpinned' if args.unpin else 'pinned'} step {args.step} of {run.path}; "
          f"pinned steps (never rotated away): {', '.join(map(str, pinned)) or 'none'}")
    return 0


def cmd_runs_export(args):
    from .core.runs.history import export_run, locate_run

    if len(args.rest) > 2:
        print("error: runs export takes RUN [STEP] DIR", file=sys.stderr)
        return 2
    step, destination = (None, args.rest[0]) if len(args.rest) == 1 else args.rest
    if step is not None and not step.isdigit():
        print(f"error: STEP must be a step number, not {step!r}", file=sys.stderr)
        return 2
    skipped = []
    try:
        copied = export_run(locate_run(args.run, args.output_dir), None if step is None else int(step),
                            destination, skipped)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {len(copied)} files to {os.path.abspath(destination)}: {os.path.basename(copied[0])}, "
          "config.json, metrics, loss plot and samples")
    if skipped:
        print(f"not copied (links or not regular files, never followed): {', '.join(skipped)}")
    return 0


def cmd_runs_compare(args):
    from .core.io import save_image
    from .core.runs.compare import compare_runs
    from .core.runs.history import locate_run

    comparison = compare_runs([locate_run(run, args.output_dir) for run in args.runs])
    out = args.out or os.path.join(args.output_dir, "comparisons", "_vs_".join(comparison.labels))
    print(comparison.text())
    save_image(comparison.loss_image, os.path.join(out, "loss.png"))  # a full disk: one line
    print(f"loss curves: {os.path.join(out, 'loss.png')}")
    if comparison.samples_image is not None:
        save_image(comparison.samples_image, os.path.join(out, "samples.png"))
        print(f"samples side by side: {os.path.join(out, 'samples.png')}")
    else:
        print("samples: not every run has sample images (sample.sample_every 0)")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="loralab", description="Train and test LoRAs for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="replay a ComfyUI workflow (API or UI format) headless")
    run.add_argument("workflow")
    run.add_argument("--comfyui", metavar="DIR",
                     help="a ComfyUI folder whose own nodes run too (KSampler, SaveImage, ...); "
                          "needs a Python that can import it, e.g. ComfyUI's. Default: "
                          "$LORALAB_COMFYUI, if set and importable")
    run.add_argument("--comfyui-args", default="", metavar="OPTIONS",
                     help="ComfyUI's own options for that run, e.g. "
                          "\"--base-directory DIR --output-directory DIR\" (--cpu is added "
                          "when there is no CUDA device)")
    run.add_argument("--input-dir", metavar="DIR",
                     help="the input folder: a workflow's dataset folders are names inside it, as "
                          "inside ComfyUI's input folder. Default: $LORALAB_INPUT, else ./input "
                          "(with --comfyui: ComfyUI's)")
    run.set_defaults(handler=cmd_run)
    train = commands.add_parser("train", help="train a LoRA from one config file")
    train.add_argument("config")
    train.set_defaults(handler=cmd_train)
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random model folder, built locally")
    tiny.add_argument("family", choices=FAMILY_NAMES)
    tiny.add_argument("folder")
    tiny.add_argument("--preset", default="tiny", help="tiny, or another size the family offers (flux: small)")
    tiny.add_argument("--single-file", help="also write one .safetensors: FLUX's transformer in BFL "
                                            "keys; SDXL/SD1.5's whole checkpoint in original keys")
    tiny.add_argument("--comfyui", action="store_true",
                      help="also write the model as ComfyUI's single files in FOLDER/comfyui/ "
                           "(diffusion_models, text_encoders, vae)")
    tiny.set_defaults(handler=cmd_make_tiny_model)
    plan = commands.add_parser("plan", help="check a dataset and plan a run by the guide: steps, epochs, memory, advice")
    plan.add_argument("dataset", help="dataset folder (or builtin:demo)")
    plan.add_argument("--config", help="a training config whose settings the plan starts from")
    plan.add_argument("--steps", type=int)
    plan.add_argument("--repeats", type=int)
    plan.add_argument("--batch-size", type=int)
    plan.add_argument("--linear", type=int, help="LoRA rank")
    plan.add_argument("--lr", type=float)
    plan.add_argument("--optimizer")
    plan.add_argument("--resolution", type=lambda text: [int(r) for r in text.split(",")],
                      help="comma-separated training resolutions, e.g. 512,768,1024")
    plan.add_argument("--family", choices=FAMILY_NAMES, help="the model family to estimate when no model file is "
                                                         "given (its reference model's shapes)")
    plan.add_argument("--model", help="local base model folder, for exact memory figures (default: FLUX.1-dev shapes)")
    plan.add_argument("--transformer", help="a single-file FLUX.1 transformer (ComfyUI's "
                      "diffusion_models) whose shapes the memory estimate reads")
    plan.add_argument("--vram", type=float, metavar="GB",
                      help="GPU memory in GiB: the cheapest settings that fit (model.quantize, gradient "
                           "checkpointing, train.offload_blocks) at 8, 12, 16, 24, 48 GB and yours, for each "
                           "family or the one named; for a named family also the peak of each quantize mode")
    plan.set_defaults(handler=cmd_plan)
    runs = commands.add_parser("runs", help="list, compare, pin and export runs").add_subparsers(dest="runs_command", required=True)
    runs_list = runs.add_parser("list", help="name, date, model, steps, final and best loss, warnings")
    runs_list.add_argument("--output-dir", default="output")
    runs_list.set_defaults(handler=cmd_runs_list)
    runs_compare = runs.add_parser("compare", help="differing settings, loss curves on one plot, samples side by side")
    runs_compare.add_argument("runs", nargs="+", help="run folders, or run names inside --output-dir")
    runs_compare.add_argument("--output-dir", default="output")
    runs_compare.add_argument("--out", help="folder for loss.png and samples.png (default: OUTPUT_DIR/comparisons/A_vs_B)")
    runs_compare.set_defaults(handler=cmd_runs_compare)
    runs_pin = runs.add_parser("pin", help="keep a step checkpoint out of rotation (max_step_saves_to_keep)")
    runs_pin.add_argument("run", help="run folder, or run name inside --output-dir")
    runs_pin.add_argument("step", type=int)
    runs_pin.add_argument("--unpin", action="store_true", help="let rotation remove it again")
    runs_pin.add_argument("--output-dir", default="output")
    runs_pin.set_defaults(handler=cmd_runs_pin)
    runs_export = runs.add_parser("export", usage="loralab runs export [-h] [--output-dir DIR] RUN [STEP] DIR",
                                  help="one LoRA (the final one, or STEP's checkpoint) with its config, "
                                       "metrics, loss plot and samples, as one new folder DIR")
    runs_export.add_argument("run", help="run folder, or run name inside --output-dir")
    runs_export.add_argument("rest", nargs="+", metavar="[STEP] DIR")
    runs_export.add_argument("--output-dir", default="output")
    runs_export.set_defaults(handler=cmd_runs_export)
    return parser


def main(argv=None):
    from .core.cpu_threads import prefer_passive_waits

    prefer_passive_waits()  # before torch loads: OpenMP reads its wait policy once
    from .core import UserError, quiet_optional_kernel_notes
    from .workflow_runner import WorkflowError  # the runner's own layer: it imports nothing of core/

    args = build_parser().parse_args(argv)
    # Library chatter that is not about the user's run (optional kernels, image processors).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    quiet_optional_kernel_notes()
    try:
        return args.handler(args)
    except (UserError, WorkflowError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
