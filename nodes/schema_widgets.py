"""Widgets declared from the one config schema (core.config.schema), and the way back from widget
values to the raw config dict that core.config.resolve() validates. A node lists its widgets as
{input name: setting("section.key")}; defaults, ranges and tooltips all come from the schema."""
from dataclasses import dataclass, field as dataclass_field

from ..core.config import ConfigError, field, resolve
from ..core.families import NAMES, families

# Required keys of sections a node does not own, filled in only to validate the node's own part
# (the first family: the one the plan estimates when no model is named).
PLACEHOLDERS = {"model": {"family": NAMES[0], "path": "-"}, "dataset": {"folder": "-"}}


def _check_placeholders():
    """What checked() fills in: a family that takes every setting (one with a text-encoder LoRA:
    others refuse network.text_encoder), and a trigger word that lets train.preservation_class
    through, so a node's own values are checked alone; the rules between sections apply when
    TrainLoRA resolves it all."""
    family = next(family.name for family in families() if family.text_encoder_lora)
    return {"model": {"family": family, "path": "-"}, "dataset": {"folder": "-", "trigger_word": "-"}}


@dataclass(frozen=True)
class Setting:
    path: str                                               # dotted config key, e.g. "train.lr"
    options: dict = dataclass_field(default_factory=dict)   # extra widget options (step, ...)

    @property
    def schema(self):
        return field(self.path)

    @property
    def nullable(self):
        """An empty (null) setting is a 0 on its number widget."""
        kinds = self.schema["type"]
        return isinstance(kinds, list) and "null" in kinds and self.widget_type in ("INT", "FLOAT")

    @property
    def widget_type(self):
        spec = self.schema
        if "enum" in spec:
            return "COMBO"
        kind = next(k for k in ([spec["type"]] if isinstance(spec["type"], str) else spec["type"])
                    if k != "null")
        return {"integer": "INT", "number": "FLOAT", "boolean": "BOOLEAN"}.get(kind, "STRING")

    def widget(self):
        """The INPUT_TYPES entry: (type or choices, options)."""
        spec, kind = self.schema, self.widget_type
        tooltip = spec.get("description", "")
        options = {"default": self.widget_value(spec.get("default")), "tooltip": tooltip}
        if kind == "COMBO":
            choices = [self.widget_value(choice) for choice in spec["enum"] if choice is not None]
            options["default"] = self.widget_value(spec.get("default")) or choices[0]
            return choices, {**options, **self.options}
        if kind in ("INT", "FLOAT"):
            low = spec.get("minimum", spec.get("exclusiveMinimum", 0))
            options["min"] = 0 if self.nullable else low
            if "maximum" in spec:
                options["max"] = spec["maximum"]
            if self.nullable:
                options["tooltip"] = f"{tooltip} Here 0 means empty."
        if spec.get("type") == "array" and spec["items"]["type"] == "string":
            options["multiline"] = True
            options["tooltip"] = f"{tooltip} One per line."
        return kind, {**options, **self.options}

    def widget_value(self, value):
        """A config value as its widget shows it."""
        if value is None:
            return 0 if self.nullable else ""
        if isinstance(value, list):
            return ("\n" if self.schema["items"]["type"] == "string" else ",").join(map(str, value))
        if isinstance(value, bool) and "enum" in self.schema:  # "auto"/true/false: combo strings
            return str(value).lower()
        return value

    def config_value(self, value):
        """A widget value as the config holds it; a list that does not parse names the key."""
        spec = self.schema
        if self.nullable and value == 0:
            return None
        if True in spec.get("enum", ()) and value in ("true", "false"):
            return value == "true"
        if spec.get("type") != "array":
            return value
        if spec["items"]["type"] == "string":
            return [line.strip() for line in str(value).splitlines() if line.strip()]
        try:
            return [int(part) for part in str(value).replace(" ", "").split(",") if part]
        except ValueError:
            raise ConfigError([f"{self.path} = {value!r}: must be whole numbers separated by "
                               "commas, e.g. 512,768,1024"]) from None


def setting(path, **options):
    return Setting(path, options)


def widget_inputs(settings):
    """INPUT_TYPES entries of {input name: Setting}."""
    return {name: entry.widget() for name, entry in settings.items()}


def config_from(settings, values):
    """The raw (nested) config of the widget values `values` {input name: value}."""
    raw = {}
    for name, entry in settings.items():
        if name in values:
            *sections, key = entry.path.split(".")
            target = raw
            for section in sections:
                target = target.setdefault(section, {})
            target[key] = entry.config_value(values[name])
    return raw


def checked(raw):
    """Validates a node's part of the config now, so a bad value fails at the node that holds
    it (the error names the key); returns `raw` unchanged."""
    resolve({**_check_placeholders(), **raw})
    return raw
