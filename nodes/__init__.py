"""LoRA Lab's ComfyUI nodes (V1 API). Each class only maps its widgets to a core call; what
differs inside ComfyUI sits in comfy_adapter."""
from .generate import LoRALabApplyLoRA, LoRALabSampleGrid
from .inputs import LoRALabConfigureLoRA, LoRALabLoadBaseModel, LoRALabLoadDataset
from .train import LoRALabSaveCheckpoint, LoRALabTrainLoRA

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRALabLoadDataset": "LoRA Lab: Load Dataset",
    "LoRALabLoadBaseModel": "LoRA Lab: Load Base Model",
    "LoRALabConfigureLoRA": "LoRA Lab: Configure LoRA",
    "LoRALabTrainLoRA": "LoRA Lab: Train LoRA",
    "LoRALabSaveCheckpoint": "LoRA Lab: Save Checkpoint",
    "LoRALabSampleGrid": "LoRA Lab: Sample Grid",
    "LoRALabApplyLoRA": "LoRA Lab: Apply LoRA",
}
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    LoRALabLoadDataset, LoRALabLoadBaseModel, LoRALabConfigureLoRA, LoRALabTrainLoRA,
    LoRALabSaveCheckpoint, LoRALabSampleGrid, LoRALabApplyLoRA)}

from .compare import LoRALabCompareRuns  # noqa: E402 (the coach's node, kept apart from the seven above)

NODE_CLASS_MAPPINGS["LoRALabCompareRuns"] = LoRALabCompareRuns
NODE_DISPLAY_NAME_MAPPINGS["LoRALabCompareRuns"] = "LoRA Lab: Compare Runs"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
