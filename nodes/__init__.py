"""LoRA Lab's ComfyUI nodes (V1 API). Each class only maps its widgets to a core call; what
differs inside ComfyUI sits in comfy_adapter."""
from ..core import quiet_optional_kernel_notes

quiet_optional_kernel_notes()  # before the nodes import peft
from .compare import LoRALabCompareRuns
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
    "LoRALabCompareRuns": "LoRA Lab: Compare Runs",
}
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    LoRALabLoadDataset, LoRALabLoadBaseModel, LoRALabConfigureLoRA, LoRALabTrainLoRA,
    LoRALabSaveCheckpoint, LoRALabSampleGrid, LoRALabApplyLoRA, LoRALabCompareRuns)}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
