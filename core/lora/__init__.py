"""LoRA adapters: inject with peft, convert to file formats, read and write files."""
from .files import bake_alpha, file_metadata, file_tensors, read_lora_file, save_lora_file
from .inject import (adapter_parameters, add_lora, add_text_encoder_lora, load_lora_weights, lora_strength,
                     lora_weights, text_encoder_names)

__all__ = ["adapter_parameters", "add_lora", "add_text_encoder_lora", "bake_alpha", "file_metadata",
           "file_tensors", "load_lora_weights", "lora_strength", "lora_weights", "read_lora_file",
           "save_lora_file", "text_encoder_names"]
