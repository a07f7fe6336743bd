"""The values that travel on LoRA Lab's links (LORALAB_DATASET, _BASE_MODEL, _CONFIG, _LORA):
small objects holding config sections, plus the loaded base model and the trained weights."""
from dataclasses import dataclass, field

from ..core.families import load_model
from . import comfy_adapter
from .graph_use import used_later


@dataclass
class DatasetSettings:
    """LORALAB_DATASET: the `dataset` section of the config."""
    section: dict


@dataclass
class TrainingSettings:
    """LORALAB_CONFIG: the network/train/save/sample/logging sections."""
    sections: dict


@dataclass(eq=False)
class BaseModel:
    """LORALAB_BASE_MODEL: the `model` section and the pipeline, loaded on first use and then
    shared by TrainLoRA and SampleGrid (ComfyUI keeps the node's output between runs)."""
    section: dict
    _pipeline: object = field(default=None, repr=False)
    _quantize: str = field(default=None, repr=False)    # what the loaded pipeline was loaded with
    used_by: set = field(default_factory=set, repr=False)  # the ids of the nodes that used it

    @property
    def family(self):
        from ..core.families import get_family

        return get_family(self.section["family"])

    def pipeline(self, config=None):
        """The loaded pipeline. quantize "auto" is chosen for `config` (the resolved training
        config; else the defaults, whose estimate covers sampling too) on ComfyUI's device; a
        different choice than the loaded one reloads. ComfyUI's own models leave the accelerator
        first: this pipeline is about to use it."""
        quantize = self.quantize_for(config)
        comfy_adapter.free_comfyui_models()
        if self._pipeline is None or quantize != self._quantize:
            self.forget()  # the old one goes before the new one loads
            with comfy_adapter.outside_inference_mode():  # TrainLoRA may train on them
                self._pipeline = load_model(self.section, quantize, comfy_adapter.comfyui_folder())
            self._quantize = quantize
        return self._pipeline

    @property
    def loaded(self):
        """The pipeline if it is loaded, else None (nothing loads)."""
        return self._pipeline

    def quantize_for(self, config=None):
        from ..core.memory import device_memory, resolve_memory_settings
        from ..core.config import resolve

        config = config or resolve({"model": self.section, "dataset": {"folder": "-"}})
        device = comfy_adapter.torch_device()
        return resolve_memory_settings(config, device_memory(device), device.type)[0]

    def release_after(self, prompt, node_id):
        """After node `node_id` of the graph `prompt` (ComfyUI's hidden inputs; both nodes take
        the base model as `base_model`) used the pipeline: when a later node uses it, it stays, off
        the accelerator (bitsandbytes-quantized weights cannot move, so those stay); else it is
        freed, RAM and accelerator, and loads again if anything asks."""
        self.used_by.add(str(node_id))
        if not used_later(prompt, node_id, "base_model", self.used_by):
            self.forget()
        elif self._pipeline is not None and self._quantize not in ("nf4", "int8"):
            with comfy_adapter.outside_inference_mode():
                comfy_adapter.free_device_memory(self._pipeline)

    def forget(self):
        if self._pipeline is not None:
            self._pipeline = self._quantize = None
            comfy_adapter.forget_pipeline()


@dataclass(eq=False)
class TrainedLoRA:
    """LORALAB_LORA: the trained weights (float32, peft names) and the resolved config."""
    name: str
    weights: dict = field(repr=False)
    config: dict = field(repr=False)
    step: int
    status: str
    lora_path: str
    run_folder: str
    to_kohya: object = field(default=None, repr=False)  # maps weights to kohya key names

    @property
    def trigger_word(self):
        return self.config["dataset"]["trigger_word"]

    def tensors(self, fmt="diffusers", dtype="float32"):
        """The tensors of the LoRA file (alpha baked into lora_B) in the given key format."""
        from ..core.lora import file_tensors

        from ..core.families import get_family

        to_diffusers = get_family(self.config["model"]["family"]).lora_to_diffusers
        return file_tensors(self.weights, self.config["network"], fmt, dtype, to_kohya=self.to_kohya,
                            to_diffusers=to_diffusers)
