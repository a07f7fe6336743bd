"""Read, default and validate a training config. Every error names the key path, the value, what
is allowed, and the file, so it can be fixed without reading a traceback."""
import copy
import json
import os

import jsonschema

from .. import UserError
from ..io import UnreadableFile, read_json
from .schema import SCHEMA


class ConfigError(UserError, ValueError):
    """A config that cannot be used; `problems` holds one line per bad key."""

    def __init__(self, problems, source=None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def defaults():
    """The default of every setting, nested as in the config file."""
    return _fill_defaults({}, SCHEMA)


def with_defaults(config):
    """A copy of a (possibly partial, unvalidated) config with every missing setting defaulted,
    so a plan works from a dataset node that knows only the dataset settings."""
    def fill(base, extra):
        merged = copy.deepcopy(base)
        for key, value in (extra or {}).items():
            merged[key] = fill(merged.get(key, {}), value) if isinstance(value, dict) else value
        return merged

    filled = fill(defaults(), config)
    _derived_defaults(filled["network"])
    return filled


def _derived_defaults(network):
    """The defaults that follow another setting: an alpha left empty equals its rank (scale 1)."""
    if network.get("linear_alpha") is None:
        network["linear_alpha"] = network["linear"]
    if network.get("conv_alpha") is None:
        network["conv_alpha"] = network["conv"] or None


def _fill_defaults(value, schema):
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    filled = dict(value)
    for key, sub in schema["properties"].items():
        if key not in filled and "default" in sub:
            filled[key] = copy.deepcopy(sub["default"])
        if key in filled:
            filled[key] = _fill_defaults(filled[key], sub)
    return filled


def _describe(error):
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    rule, limit, value = error.validator, error.validator_value, error.instance
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if rule == "minimum":
        return f"{path} = {shown}: must be at least {limit}"
    if rule == "maximum":
        return f"{path} = {shown}: must be at most {limit}"
    if rule == "exclusiveMinimum":
        return f"{path} = {shown}: must be greater than {limit}"
    if rule == "enum":
        return f"{path} = {shown}: must be one of {', '.join(json.dumps(o) for o in limit)}"
    if rule == "type":
        kinds = limit if isinstance(limit, list) else [limit]
        return f"{path} = {shown}: must be of type {' or '.join(kinds)}"
    if rule == "required":
        missing = error.message.split("'")[1]
        where = f"{path}." if error.absolute_path else ""
        return f"{where}{missing} is missing: it is required"
    if rule == "additionalProperties":
        extra = ", ".join(sorted(set(value) - set(error.schema["properties"])))
        known = ", ".join(error.schema["properties"])
        return f"{path}: unknown key {extra}; known keys are {known}"
    if rule == "minItems":
        return f"{path}: needs at least {limit} item(s)"
    if rule == "pattern":
        return f"{path} = {shown}: must match {limit}"
    if rule == "maxLength":
        return f"{path}: {len(value)} characters long; must be at most {limit}"
    if rule == "minLength":
        return f"{path}: must not be empty"
    return f"{path} = {shown}: {error.message}"


def resolve(config, source=None):
    """Fill defaults into `config` and validate it; returns the resolved copy or raises
    ConfigError listing every problem."""
    if not isinstance(config, dict):
        raise ConfigError([f"the config must be a JSON object, not {type(config).__name__}"], source)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError([_describe(e) for e in errors], source)
    resolved = _fill_defaults(config, SCHEMA)
    if source:  # relative paths in a config file are relative to the file, not to the shell
        base = os.path.dirname(os.path.abspath(source))
        for section, key in _path_settings():
            value = resolved[section].get(key)
            if value and not value.startswith("builtin:") and not os.path.isabs(os.path.expanduser(value)):
                resolved[section][key] = os.path.normpath(os.path.join(base, value))
    model = resolved["model"]
    if model["family"] == "auto":
        from ..families import detect_family

        try:
            model["family"] = detect_family(model)
        except (ValueError, OSError) as error:
            raise ConfigError([str(error)], source) from None
    from ..families import get_family

    family = get_family(model["family"])
    for dotted, value in family.config_defaults.items():  # only where the config is silent
        section, key = dotted.split(".")
        if key not in (config.get(section) or {}):
            resolved[section][key] = copy.deepcopy(value)
    problems = _family_problems(family, model, resolved["network"]) + _network_problems(resolved["network"])
    if resolved["train"]["timestep_min"] >= resolved["train"]["timestep_max"]:
        problems.append(f"train.timestep_min = {resolved['train']['timestep_min']} must be below "
                        f"train.timestep_max = {resolved['train']['timestep_max']}")
    if resolved["train"]["preservation_class"] and not resolved["dataset"]["trigger_word"]:
        problems.append(f"train.preservation_class = {json.dumps(resolved['train']['preservation_class'])} "
                        "needs dataset.trigger_word: preservation replaces the trigger in each caption "
                        "by the class word; set dataset.trigger_word to the word your captions use "
                        "for the concept, or leave train.preservation_class empty")
    if problems:
        raise ConfigError(problems, source)
    _derived_defaults(resolved["network"])
    if resolved["save"]["format"] is None:
        resolved["save"]["format"] = family.default_save_format
    return resolved


def _path_settings():
    """(section, key) of every setting that holds a path: the model folder, each family's
    single files, the dataset folder and the output folder."""
    from ..families import single_file_keys

    return [("model", "path"), *(("model", key) for key in single_file_keys()),
            ("dataset", "folder"), ("save", "output_dir")]


def _network_problems(network):
    """Settings that only one network.type takes."""
    kind, problems = network["type"], []
    if network["dora"] and kind != "lora":
        problems.append(f"network.dora = true works with network.type lora only, not {kind}: set "
                        "network.type to lora, or network.dora to false")
    if kind != "lora" and (network.get("conv") or 0) > 0:
        problems.append(f"network.conv (LoCon) = {network['conv']} works with network.type lora only "
                        f"here, not {kind}: set network.conv to 0")
    return problems


def _family_problems(family, model, network):
    """What the family needs of the model section: a folder or its single files, and none of
    another family's files; and what it offers of the network section."""
    from ..families import folder_family, single_file_keys

    problems = []
    if network["text_encoder"] and not family.text_encoder_lora:
        problems.append(family.no_text_encoder_lora())
    found = folder_family(model["path"]) if model["path"] else None
    if found and found != family.name:
        problems.append(f"model.family = {family.name}, but model.path {model['path']!r} is a {found} "
                        f"model: set model.family to {found} (or auto), or give a {family.name} model")
    foreign = [key for key in single_file_keys() if model.get(key) and key not in family.single_files]
    if foreign:
        problems.append(f"{', '.join('model.' + k for k in foreign)} given, but model.family is "
                        f"{family.name}, which does not use it: remove it, or set model.family to the "
                        "model the file belongs to")
    required = family.required_files
    if not model["path"] and not all(model.get(key) for key in required):
        missing = ", ".join(f"model.{key}" for key in required if not model.get(key))
        problems.append(f"model.path is empty and {missing} not given: give a local diffusers folder "
                        f"in model.path, or {family.single_files_text}")
    return problems


MAX_CONFIG_BYTES = 2**20  # a config is a few KB; a FIFO, a device or a huge file is never read


def load_config(path):
    """Read a JSON config file (a regular file, at most MAX_CONFIG_BYTES) and resolve it."""
    try:
        raw = read_json(path, follow_links=True, max_bytes=MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], path) from None
    except (UnreadableFile, OSError) as error:
        raise ConfigError([str(error).replace(f"{path} ", "the file ", 1)], path) from None
    return resolve(raw, source=path)
