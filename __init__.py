"""LoRA Lab: a ComfyUI node pack that trains LoRAs, and the `loralab` engine behind it."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
