"""FLUX.1 module names: diffusers <-> Black Forest Labs (BFL). BFL names are what ComfyUI's
single files and kohya LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`) use; BFL fuses q, k, v
(and the single blocks' MLP input) into one linear. Hand-written tables, not diffusers'
converters: those hard-code FLUX.1's width 3072, so they cannot convert the tiny test models."""
import torch

from ...lora.files import module_tensors, only_lora_pairs
from ..parts.streaming import swap_halves

# BFL module (inside a block) <- the diffusers modules it fuses, in order.
DOUBLE_BLOCK = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
DOUBLE_BLOCK_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_BLOCK = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
}
SINGLE_BLOCK_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def block_modules(num_double, num_single):
    """[(bfl module, [diffusers modules])] for every block linear of the model."""
    pairs = []
    for i in range(num_double):
        pairs += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds])
                  for b, ds in DOUBLE_BLOCK.items()]
    for i in range(num_single):
        pairs += [(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds])
                  for b, ds in SINGLE_BLOCK.items()]
    return pairs


def _one_to_one(num_double, num_single):
    """(bfl key, diffusers key, swap halves) for every tensor that is not fused: top-level
    weights and biases, and the q/k norms of each block."""
    for bfl_name, diffusers_name in TOP_LEVEL.items():
        for suffix in ("weight", "bias"):
            yield (f"{bfl_name}.{suffix}", f"{diffusers_name}.{suffix}",
                   bfl_name == "final_layer.adaLN_modulation.1")
    for i in range(num_double):
        for b, d in DOUBLE_BLOCK_NORMS.items():
            yield f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}", False
    for i in range(num_single):
        for b, d in SINGLE_BLOCK_NORMS.items():
            yield f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}", False


def transformer_to_bfl(state_dict, num_double, num_single):
    """A diffusers FluxTransformer2DModel state dict with BFL keys (what ComfyUI loads)."""
    bfl = {}
    for bfl_key, diffusers_key, swap in _one_to_one(num_double, num_single):
        if diffusers_key in state_dict:  # biases are optional (guidance_in only on dev)
            value = state_dict[diffusers_key]
            bfl[bfl_key] = swap_halves(value) if swap else value
    for bfl_name, parts in block_modules(num_double, num_single):
        for suffix in ("weight", "bias"):
            tensors = [state_dict[f"{p}.{suffix}"] for p in parts if f"{p}.{suffix}" in state_dict]
            if tensors:
                bfl[f"{bfl_name}.{suffix}"] = torch.cat(tensors, dim=0)
    return bfl


def lora_to_kohya(weights, num_double, num_single):
    """diffusers LoRA weights (peft names, no prefix, alpha already in lora_B) -> kohya names.
    Fused BFL modules get down = [A_q; A_k; A_v] and up = blockdiag(B_q, B_k, B_v), which is the
    exact sum of the separate LoRAs; alpha = the fused rank, so the scale stays 1."""
    if not only_lora_pairs(weights):
        # LoKr, LoHa, DoRA cannot fuse q, k, v: OneTrainer's unfused names, which ComfyUI maps
        return module_tensors(weights, lambda module: "lora_transformer_" + module.replace(".", "_"))
    kohya = {}
    for bfl_name, parts in block_modules(num_double, num_single):
        present = [p for p in parts if f"{p}.lora_A.weight" in weights]
        if not present:
            continue
        if len(present) != len(parts):
            raise ValueError(f"kohya format needs a LoRA on all of {parts} or none; has {present}")
        downs = [weights[f"{p}.lora_A.weight"] for p in parts]
        ups = [weights[f"{p}.lora_B.weight"] for p in parts]
        name = "lora_unet_" + bfl_name.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0)
        kohya[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
        kohya[f"{name}.alpha"] = torch.tensor(float(sum(d.shape[0] for d in downs)))
    return kohya


def stored_key(key, names):
    """The name a file keeps BFL's `key` under. ComfyUI loads (and so saves) the q/k norms'
    `..._norm.scale` as `..._norm.weight` (comfy/supported_models.py, Flux.process_unet_state_dict);
    its loader takes either, so ours does too."""
    if key.endswith("_norm.scale") and key not in names:
        return key[:-len("scale")] + "weight"
    return key


def bfl_to_transformer(bfl, reference_shapes, num_double, num_single):
    """BFL keys -> diffusers keys; fused weights are split by the shapes of the diffusers model
    (`reference_shapes`: name -> shape), so any FLUX-shaped model converts, not only 3072-wide."""
    prefixes = ("model.diffusion_model.", "diffusion_model.", "model.")
    for prefix in prefixes:  # ComfyUI and some exporters save with a prefix
        if any(k.startswith(prefix + "double_blocks.") for k in bfl):
            bfl = {k[len(prefix):]: v for k, v in bfl.items() if k.startswith(prefix)}
            break
    diffusers = {}
    for bfl_key, diffusers_key, swap in _one_to_one(num_double, num_single):
        bfl_key = stored_key(bfl_key, bfl)
        if bfl_key in bfl:
            diffusers[diffusers_key] = swap_halves(bfl[bfl_key]) if swap else bfl[bfl_key]
    for bfl_name, parts in block_modules(num_double, num_single):
        for suffix in ("weight", "bias"):
            if f"{bfl_name}.{suffix}" not in bfl:
                continue
            sizes = [reference_shapes[f"{p}.{suffix}"][0] for p in parts]
            for part, tensor in zip(parts, torch.split(bfl[f"{bfl_name}.{suffix}"], sizes, dim=0)):
                diffusers[f"{part}.{suffix}"] = tensor
    return diffusers


def is_bfl(keys):
    return any(".double_blocks." in "." + k for k in keys)
