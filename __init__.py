"""LoRA Lab: a ComfyUI node pack that trains LoRAs, and the `loralab` engine behind it.

ComfyUI imports this folder (under whatever name it was cloned as) and reads the two mappings;
imports are relative so that works as well as `import loralab`."""
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Loaded as a lone file, not as a package (pytest collecting the repository root when the
    # checkout's folder name is not a Python name): there is no package to register from.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
