"""The workflow runner: replays ComfyUI-protocol node graphs (API or editor format) headless
with a given registry {class_type: V1 node class}. It imports neither ComfyUI nor LoRA Lab's
core or nodes: what it runs is the registry it is given. Only the output nodes and what they
need run; every other node is skipped and named (plan.py).

    result = run_workflow("train.json", NODE_CLASS_MAPPINGS, on_event=print)
"""

from . import interrupt
from .errors import NodeFailed, WorkflowError, WorkflowInterrupted, make_problem
from .executor import RunResult, execute
from .formats import ApiPrompt, api_prompt_from_dict, is_ui_workflow, load_workflow, unwrap_workflow
from .plan import skip_unneeded
from .ui_format import ui_to_api
from .validate import validate_prompt

__all__ = [
    "ApiPrompt", "NodeFailed", "RunResult", "WorkflowError", "WorkflowInterrupted", "interrupt",
    "load_workflow", "run_workflow", "to_api", "validate",
]


def to_api(workflow, registry: dict) -> ApiPrompt:
    """An ApiPrompt from a path, a UI- or API-format dict (or an ApiPrompt, returned as is).

    Skipped nodes (muted, bypassed, and every node no output needs) are listed in .skipped.
    A workflow wrapped as ComfyUI's /prompt body or /history entry ({"prompt": {...}}) is
    unwrapped; one of the wrong shape raises WorkflowError, never another exception.
    """
    if isinstance(workflow, ApiPrompt):
        return workflow
    workflow = unwrap_workflow(load_workflow(workflow))
    if not workflow:
        raise WorkflowError([make_problem(None, None, None, (
            "not a workflow: it holds an empty object, expected nodes"))])
    if is_ui_workflow(workflow):
        prompt = ui_to_api(workflow, registry)
    else:
        prompt = api_prompt_from_dict(workflow)
    skip_unneeded(prompt, registry)
    return prompt


def validate(api_prompt, registry: dict) -> list:
    """Check everything before running; raise one WorkflowError listing every problem.

    Takes an ApiPrompt or anything to_api takes; returns the node ids to run, in order.
    """
    return validate_prompt(to_api(api_prompt, registry), registry)


def run_workflow(workflow, registry: dict, on_event=None) -> RunResult:
    """Validate, then run what the output nodes need. on_event(dict) gets "skipped",
    "node_start" and "node_done" events (node_id, title, class_type, index, total, seconds).

    Clears the stop flag first; a stop requested during the run (workflow_runner.interrupt)
    ends it between nodes with WorkflowInterrupted. A node that raises gives NodeFailed.
    """
    prompt = to_api(workflow, registry)
    order = validate_prompt(prompt, registry)
    interrupt.clear()
    return execute(prompt, order, registry, on_event)
