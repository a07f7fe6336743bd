"""The shipped shapes model as one file: every weight of its diffusers folder in fp16 under
"<file path>::<tensor name>", every other file (configs, tokenizers) as text in the metadata."""
import json
import os

import torch

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes-flux.safetensors")
FILES_KEY = "loralab.files"
# T5 tokens the unpacked model reads (its tokenizer's model_max_length). It was pretrained
# reading 512, but its captions are under 16 tokens: measured, it draws the same scenes at 64
# (colour 16/16, background 16/16, shape 10/16 at both, 4 prompts x 4 seeds), and 80 tokens in
# place of 528 make each training step and sample about 4x cheaper.
TEXT_LENGTH = 64


def pack_folder(folder, path, extra_metadata=None):
    """Write `folder` (a diffusers folder) as one safetensors file at `path`; return the path."""
    from safetensors.torch import load_file, save_file

    tensors, texts = {}, {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder).replace(os.sep, "/")
            if name.endswith(".safetensors"):
                for key, value in load_file(full).items():
                    tensors[f"{relative}::{key}"] = value.to(torch.float16).contiguous()
            elif name.endswith((".json", ".txt", ".model")):
                with open(full, encoding="utf-8") as f:
                    texts[relative] = f.read()
    metadata = {FILES_KEY: json.dumps(texts), **(extra_metadata or {})}
    save_file(tensors, path, metadata=metadata)
    return path


def build_shapes_flux(folder, path=SHIPPED):
    """Rebuild the diffusers folder from the packed file (weights back in fp32, the T5 tokenizer
    reading TEXT_LENGTH tokens); return it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as packed:
        texts = json.loads(packed.metadata()[FILES_KEY])
        files = {}
        for key in packed.keys():
            relative, name = key.split("::", 1)
            files.setdefault(relative, {})[name] = packed.get_tensor(key).float()
    settings = json.loads(texts["tokenizer_2/tokenizer_config.json"])
    texts["tokenizer_2/tokenizer_config.json"] = json.dumps({**settings, "model_max_length": TEXT_LENGTH}, indent=2)
    for relative, text in texts.items():
        target = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    for relative, weights in files.items():
        target = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        save_file(weights, target, metadata={"format": "pt"})
    return folder
