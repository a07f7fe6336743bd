"""docs/config.md, the config reference, written from the schema (schema.py) and the families'
config defaults, so that it cannot drift from what the CLI, the nodes and config files accept;
tests/test_docs.py fails when the committed file is stale.

    python -m loralab.core.config.reference > docs/config.md
"""
import json

from .schema import SCHEMA

HEADER = """# Config reference

<!-- Generated from core/config/schema.py by `python -m loralab.core.config.reference > docs/config.md`;
edit the schema, not this file. -->

Every setting of a config file (`loralab train CONFIG.json`), with its default and what it
allows. The nodes' widgets are the same settings. Only `model` (a path or files) and
`dataset.folder` are required; a bad value is refused before any model loads, with the key, the
value and what is allowed.
"""


NOTES = """## Notes

- `model.family`: a family that does not match the files is refused.
- `model.quantize`, `train.gradient_checkpointing` and `train.offload_blocks: auto` are chosen
  together from the estimate, with 10% headroom: gradient checkpointing first, then fp8, then as
  few offloaded blocks as fit, then nf4 (core/memory/lower.py's one list; on a CPU nothing is
  quantized, checkpointed or offloaded). An `offload_blocks` larger than the model's blocks is
  refused. `loralab plan DATASET --vram GB` prints the estimates
  ([measurements](measurements.md#offloading-and-the-fit-per-card)).
- `train.steps` empty: the guide's steps for the number of training images
  ([guide, section 4](training-guide.md#4-steps-epochs-and-the-plan)); regularization images add
  `dataset.regularization_ratio` entries per training entry to each epoch, so the steps grow
  by as much ([guide](training-guide.md#regularization-images)).
- `save.max_step_saves_to_keep`: with 2000 steps and `save_every` 250, the default 4 keeps 1250,
  1500, 1750 and 2000 (`loralab runs pin` keeps one out of rotation).
- `train.preservation_class`: see the [guide, section 9](training-guide.md#9-bleed-and-preservation).
- Model files, the run folder and the LoRA file formats: [files.md](files.md).
"""


def shown(value):
    """A default as a config file writes it (JSON), empty for none."""
    return "" if value is None else f"`{json.dumps(value)}`"


def allowed(spec):
    """What a setting accepts, in a few words."""
    if "enum" in spec:
        return ", ".join("empty" if option is None else f"`{json.dumps(option)}`" for option in spec["enum"])
    kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    kind = " or ".join("empty" if k == "null" else k for k in kinds)
    if "items" in spec:
        kind += " of " + spec["items"]["type"] + "s"
    low = spec.get("minimum", spec.get("items", {}).get("minimum"))
    high = spec.get("maximum", spec.get("items", {}).get("maximum"))
    if "exclusiveMinimum" in spec:
        kind += f" > {spec['exclusiveMinimum']}"
    elif low is not None:
        kind += f" {low}" + (f" to {high}" if high is not None else " or more")
    return kind


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def section_table(name, section):
    required = set(section.get("required", ()))
    lines = [f"## `{name}`", "", "| key | default | allowed | |", "|---|---|---|---|"]
    for key, spec in section["properties"].items():
        default = "required" if key in required else shown(spec.get("default"))
        lines.append(f"| `{name}.{key}` | {default} | {cell(allowed(spec))} | {cell(spec.get('description', ''))} |")
    return lines


def markdown():
    lines = [HEADER]
    top = {key: spec for key, spec in SCHEMA["properties"].items() if spec.get("type") != "object"}
    lines += ["## Top level", "", "| key | default | allowed | |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {shown(spec.get('default'))} | {cell(allowed(spec))} | {cell(spec['description'])} |"
              for key, spec in top.items()]
    for name, spec in SCHEMA["properties"].items():
        if spec.get("type") == "object":
            lines += [""] + section_table(name, spec)
    lines += ["", "## Family defaults", "",
              "Where a family's common practice differs from the defaults above (FLUX.1's), its own "
              "apply to the settings a config leaves out:", "",
              "| family | setting | default |", "|---|---|---|"]
    from ..families import families  # each family's own defaults (core/families/<name>/)

    for family in families():
        lines += [f"| {family.title or family.name} | `{key}` | {shown(value)} |"
                  for key, value in family.config_defaults.items()]
    return "\n".join(lines) + "\n\n" + NOTES


if __name__ == "__main__":
    print(markdown(), end="")
