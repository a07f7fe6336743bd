"""SD1.5 / SDXL module names: diffusers <-> the original (LDM / "sgm") layout of single-file
checkpoints, for the UNet, the VAE, CLIP-L and OpenCLIP, and LoRA weights in kohya's names.

The LDM UNet numbers its blocks in one flat sequence (input_blocks.N, middle_block.N,
output_blocks.N), where diffusers nests them (down_blocks.i.resnets.j); the tables below are built
from a diffusers UNet config, so any width and depth (real or tiny) maps."""
import re

import torch

from ...lora.files import module_tensors, only_lora_pairs

# the parts of a single-file checkpoint (ComfyUI's models/checkpoints)
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
# metadata our writer stores for what shapes cannot tell
HEADS_KEY = "loralab.num_attention_heads"      # the first text encoder's
HEADS_2_KEY = "loralab.num_attention_heads_2"  # SDXL's second (OpenCLIP)
V_PRED_KEY = "v_pred"                          # ComfyUI's marker of a v-prediction checkpoint

# inside a resnet: diffusers module -> LDM module
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _has_attention(block_type):
    return block_type.startswith("CrossAttn")


def unet_module_map(config):
    """{diffusers module: LDM module} of every UNet module that holds weights (resnets expanded
    to their layers, attention blocks as a whole: their inner names are the same in both)."""
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block must be one number, not {per_block}")
    table = dict(UNET_TOP)

    def resnet(diffusers, ldm):
        table.update({f"{diffusers}.{d}": f"{ldm}.{l}" for d, l in RESNET.items()})

    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0")
            if _has_attention(block_type):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0")
            if _has_attention(block_type):
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < levels - 1:
            index = i * (per_block + 1) + per_block
            table[f"up_blocks.{i}.upsamplers.0.conv"] = \
                f"output_blocks.{index}.{2 if _has_attention(block_type) else 1}.conv"
    return table


def rename(name, table):
    """`name` with its longest prefix found in `table` replaced; None if no prefix is there."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head]] + parts[cut:])
    return None


def unet_to_ldm(names, config):
    """{diffusers key: LDM key (no prefix)} for the UNet keys `names`."""
    table = unet_module_map(config)
    mapping = {}
    for name in names:
        ldm = rename(name, table)
        if ldm is None:
            raise KeyError(f"no LDM name for UNet key {name}")
        mapping[name] = ldm
    return mapping


# ---------------------------------------------------------------------------------------------
# VAE: the same names as FLUX's autoencoder (BFL's ae.safetensors is the LDM layout)

def vae_to_ldm(shapes, levels):
    """{LDM key: (diffusers key, LDM shape)}; the mid-block attention is 1x1 convolutions there."""
    from ..parts.autoencoder import vae_to_bfl

    return vae_to_bfl(shapes, levels)


def is_diffusers_vae(names):
    return any(n.startswith("encoder.down_blocks.") for n in names)


# ---------------------------------------------------------------------------------------------
# Text encoders

OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def clip_key(name):
    """A transformers CLIPTextModel key (flattened or not) in the checkpoint's `text_model.` form."""
    return name if name.startswith("text_model.") else "text_model." + name


def _plain(name):
    return name[len("text_model."):] if name.startswith("text_model.") else name


def openclip_from_diffusers(state_dict):
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (SDXL's second encoder): q, k,
    v fused into in_proj, the projection stored transposed (OpenCLIP multiplies x @ P)."""
    plain = {_plain(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {}
    for name, ldm in OPENCLIP_TOP.items():
        out[ldm] = plain[name]
    out["text_projection"] = plain["text_projection.weight"].T.contiguous()
    layers = sorted({int(m.group(1)) for m in map(re.compile(r"encoder\.layers\.(\d+)\.").match, plain) if m})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{target}attn.in_proj_{suffix}"] = torch.cat(
                [plain[f"{source}self_attn.{p}_proj.{suffix}"] for p in "qkv"], dim=0)
            for d, l in OPENCLIP_LAYER.items():
                out[f"{target}{l}.{suffix}"] = plain[f"{source}{d}.{suffix}"]
    return out


def openclip_to_diffusers(weights):
    """The inverse of openclip_from_diffusers (keys without `text_model.`, as the flattened
    transformers models and the `text_model` inside CLIPTextModelWithProjection name them);
    logit_scale and the attention mask buffer are dropped."""
    out = {}
    for name, ldm in OPENCLIP_TOP.items():
        if ldm in weights:
            out[name] = weights[ldm]
    if "text_projection" in weights:
        out["text_projection.weight"] = weights["text_projection"].T.contiguous()
    pattern = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    reverse = {l: d for d, l in OPENCLIP_LAYER.items()}
    for key, value in weights.items():
        match = pattern.match(key)
        if not match:
            continue
        target, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
        if rest.startswith("attn.in_proj_"):
            suffix = rest[len("attn.in_proj_"):]
            for p, piece in zip("qkv", value.chunk(3, dim=0)):
                out[f"{target}self_attn.{p}_proj.{suffix}"] = piece
        else:
            module, _, suffix = rest.rpartition(".")
            if module in reverse:
                out[f"{target}{reverse[module]}.{suffix}"] = value
    return out


# ---------------------------------------------------------------------------------------------
# LoRA in kohya's names

# text-encoder LoRA prefixes (peft names prefixed by the pipeline attribute) -> kohya's
KOHYA_TEXT = {"sd15": {"text_encoder.": "lora_te_"},
              "sdxl": {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}}


def lora_to_kohya(weights, family, unet_config=None):
    """peft LoRA weights (`<module>.lora_A.weight` / `.lora_B.weight`, alpha already baked into
    lora_B; UNet modules unprefixed or `unet.`, text encoders `text_encoder.` / `text_encoder_2.`)
    -> kohya sd-scripts' names: SD1.5's UNet by diffusers module names
    (lora_unet_down_blocks_1_attentions_0_..._to_q), SDXL's by LDM names
    (lora_unet_input_blocks_4_1_..._to_q; `unet_config` needed, the real SDXL-base's by default),
    text encoders lora_te_ (SD1.5) or lora_te1_/lora_te2_ (SDXL) + text_model_encoder_layers_....
    Conv LoRA (4-D down/up) keeps its shapes. `.alpha` is each module's rank: scale 1."""
    if family not in KOHYA_TEXT:
        raise ValueError(f"family must be 'sd15' or 'sdxl', not {family!r}")
    table = None
    if family == "sdxl":
        table = unet_module_map(unet_config or real_unet_config("sdxl"))
    if not only_lora_pairs(weights):  # LoKr, LoHa, DoRA
        return module_tensors(weights, lambda module: _kohya_name(module, family, table))
    kohya = {}
    for key, down in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        up = weights[module + ".lora_B.weight"]
        name = _kohya_name(module, family, table)
        kohya[f"{name}.lora_down.weight"] = down
        kohya[f"{name}.lora_up.weight"] = up
        kohya[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return kohya


def _kohya_name(module, family, table):
    for prefix, kohya_prefix in KOHYA_TEXT[family].items():
        if module.startswith(prefix):
            return kohya_prefix + clip_key(module[len(prefix):]).replace(".", "_")
    module = module[len("unet."):] if module.startswith("unet.") else module
    if table is not None:
        ldm = rename(module, table)
        if ldm is None:
            raise KeyError(f"no LDM name for the LoRA module {module}")
        module = ldm
    return "lora_unet_" + module.replace(".", "_")


def real_unet_config(family):
    """The UNet config of the real SD1.5 / SDXL-base (the package's configs/)."""
    import json
    import os

    with open(os.path.join(os.path.dirname(__file__), "configs", family, "unet", "config.json")) as f:
        return json.load(f)


# diffusers' attention-processor LoRA names (`attn1.processor.to_q_lora.down.weight`): diffusers
# still loads them (converting to peft), and ComfyUI 0.33 maps a UNet's attention LoRA only in
# this form, not under peft's `attn1.to_q.lora_A.weight`.
_ATTENTION_LORA = re.compile(r"(.*)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")
_OTHER_LORA = re.compile(r"(.*)\.lora_([AB])\.weight")


def lora_to_diffusers(weights):
    """peft LoRA weights of the UNet (alpha baked in) -> the diffusers-format file's keys that
    both diffusers' load_lora_weights and ComfyUI's loader take: attention projections as
    `unet.<block>.processor.to_q_lora.down.weight`, other modules (feed-forward, LoCon convs) as
    `unet.<module>.lora.down.weight`. Text-encoder weights keep their peft names and prefix."""
    named = {}
    if not only_lora_pairs(weights):
        raise ValueError("a LoKr, LoHa or DoRA file on SD1.5/SDXL has kohya names: set save.format to kohya")
    for key, value in weights.items():
        attention, other = _ATTENTION_LORA.fullmatch(key), _OTHER_LORA.fullmatch(key)
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            named[key] = value
        elif attention:
            block, projection, part = attention.groups()
            named[f"unet.{block}.processor.{projection.removesuffix('.0')}_lora."
                  f"{'down' if part == 'A' else 'up'}.weight"] = value
        elif other:
            module, part = other.groups()
            named[f"unet.{module}.lora.{'down' if part == 'A' else 'up'}.weight"] = value
        else:
            raise ValueError(f"not a peft LoRA weight: {key}")
    return named
