"""One schema for every setting (nodes, CLI and config file), defaults from the guide."""
from .load import ConfigError, defaults, load_config, resolve, with_defaults
from .plan import epochs, recommended_steps, step_band, steps_per_epoch
from .schema import SCHEMA, field

__all__ = ["SCHEMA", "ConfigError", "defaults", "epochs", "field", "load_config",
           "recommended_steps", "resolve", "step_band", "steps_per_epoch", "with_defaults"]
