"""Qwen3, the text encoder Z-Image (Qwen3-4B) and FLUX.2 klein (Qwen3-4B or 8B) read prompts with:
what its file looks like, the model filled from ComfyUI's file (models/text_encoders,
qwen_3_4b.safetensors; bf16 or fp8), where its tokenizer is in ComfyUI's source, its chat template,
and the freed-and-reloaded source of a pipeline's encoder."""
from dataclasses import dataclass
import os
import re

import torch

from .files import SafetensorsFile, count_layers
from .streaming import check_complete, empty_model, fill, freeze, model_shapes

QWEN_TOKENIZER = os.path.join("comfy", "text_encoders", "qwen25_tokenizer")  # Qwen3's vocabulary too

# Qwen3's chat template, reduced to what a one-message prompt uses: the pipeline formats prompts
# with it (apply_chat_template, enable_thinking=True), which gives ComfyUI's llama_template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")

def qwen3_prefix(names):
    """'model.' (ComfyUI's and Hugging Face's files) or '' of a Qwen3 text encoder, or None: the
    keys ComfyUI's detect_te_model reads as Qwen3 (q_norm beside post_attention_layernorm)."""
    for prefix in ("model.", ""):
        if prefix + "layers.0.self_attn.q_norm.weight" in names and prefix + "layers.0.post_attention_layernorm.weight" in names:
            return prefix
    return None


def describe(tensors):
    """"a Qwen3 text encoder (<width> wide)", or None for another file."""
    prefix = qwen3_prefix(tensors)
    if prefix is None:
        return None
    return f"a Qwen3 text encoder ({tensors[prefix + 'embed_tokens.weight']['shape'][1]} wide)"


def load_text_encoder(path, dtype, setting="model.text_encoder_path"):
    """transformers' Qwen3Model from a file already checked to be Qwen3, its config read from the
    shapes (Qwen3-4B: 36 layers, 2560 wide; Qwen3-8B: 36 layers, 4096 wide)."""
    from transformers import Qwen3Config, Qwen3Model

    with SafetensorsFile(path) as source:
        prefix = qwen3_prefix(source.tensors)
        shape = lambda key: source.tensors[prefix + key]["shape"]  # noqa: E731
        vocab, hidden = shape("embed_tokens.weight")
        head_dim = shape("layers.0.self_attn.q_norm.weight")[0]
        config = Qwen3Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0],
            num_hidden_layers=count_layers(source.tensors, re.escape(prefix) + r"layers\.(\d+)\."),
            num_attention_heads=shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
            num_key_value_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim, head_dim=head_dim,
            rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960)  # Qwen3-4B's (ComfyUI's llama.py)
        model = empty_model(lambda: Qwen3Model(config))
        shapes = model_shapes(model)
        plan = [(key, [(key[len(prefix):], shapes[key[len(prefix):]][0])], False) for key in source.keys()
                if key.startswith(prefix) and key[len(prefix):] in shapes]
        fill(model, source, plan, dtype, setting)
    check_complete(model, setting, path)
    return freeze(model)


@dataclass(frozen=True)
class TextEncoderSource:
    """Where the Qwen3 text encoder came from, so that it can be freed after encoding (Qwen3-4B is
    about 8 GB in bf16) and loaded again for the next prompts instead of parked in RAM. `file`
    was checked when the pipeline loaded."""
    folder: str
    file: str
    dtype: torch.dtype

    def load(self):
        from transformers import AutoModel

        from .loading import quiet_loading

        if self.file:
            return load_text_encoder(self.file, self.dtype)
        with quiet_loading():
            encoder = AutoModel.from_pretrained(self.folder, subfolder="text_encoder", dtype=self.dtype,
                                                local_files_only=True)
        encoder.requires_grad_(False)
        return encoder.eval()
