"""The shapes of the JSON files a run folder holds, as LoRA Lab writes them. What is read back is
checked against these; a file (or metrics line, or pin) that does not match is named and skipped."""

_OBJECT = {"type": "object"}
_PATH = {"type": ["string", "null"]}
_NUMBER = {"type": "number"}

# config.json: the resolved settings plus what the run adds; only what readers rely on is pinned
RUN_CONFIG = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "name": {"type": "string"},
        "model": {"type": "object", "properties": {key: _PATH for key in (
            "path", "transformer_path", "clip_l_path", "t5_path", "vae_path", "checkpoint_path")}},
        "train": {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 0}}},
        "sample": {"type": "object", "properties": {"prompts": {"type": "array", "items": {"type": "string"}}}},
        **{section: _OBJECT for section in ("dataset", "network", "save", "logging", "dataset_stats",
                                            "versions", "identity")},
        "started_because": {"type": ["string", "null"]},
    },
}

WARNINGS = {"type": "array", "items": {"type": "string"}}  # warnings.json: the coach's warnings

# one line of metrics.jsonl (core/trainer/loop.py writes it every performance_log_every steps)
METRICS_LINE = {
    "type": "object",
    "required": ["step"],
    "properties": {
        "step": {"type": "integer", "minimum": 0},
        **{key: _NUMBER for key in ("loss", "validation_loss", "lr", "grad_norm", "seconds_per_step",
                                    "cpu_peak_mb", "epoch", "skipped_steps")},
        "gpu_peak_mb": {"type": ["number", "null"]},
    },
}

PINS = {"type": "object", "required": ["steps"], "properties": {"steps": {"type": "array"}}}
PINNED_STEP = {"type": "integer", "minimum": 0}  # each entry of pins.json's steps
