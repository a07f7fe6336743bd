"""The run folder (shared/DESIGN.md, "Run folder"): <output_dir>/<name>/ with config.json,
metrics.jsonl, step checkpoints <name>_<step 9 digits>.safetensors (+ .state.pt for resume),
the final <name>.safetensors, samples/ and loss.png."""
import json
import os
import re

from .atomic import write_json


class RunFolder:
    def __init__(self, output_dir, name):
        self.name = name
        self.path = os.path.join(os.path.abspath(os.path.expanduser(output_dir)), name)
        self._step_file = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")

    def file(self, *parts):
        return os.path.join(self.path, *parts)

    @property
    def final_lora(self):
        return self.file(f"{self.name}.safetensors")

    @property
    def metrics(self):
        return self.file("metrics.jsonl")

    def checkpoint(self, step):
        return self.file(f"{self.name}_{step:09d}.safetensors")

    def checkpoint_state(self, step):
        return self.file(f"{self.name}_{step:09d}.state.pt")

    def samples(self, step):
        return self.file("samples", f"{step:09d}")

    def checkpoints(self):
        """Steps of the step checkpoints on disk, oldest first."""
        if not os.path.isdir(self.path):
            return []
        steps = [int(m.group(1)) for m in map(self._step_file.match, os.listdir(self.path)) if m]
        return sorted(steps)

    def resumable(self):
        """Newest step whose LoRA file and resume state are both complete, or None."""
        for step in reversed(self.checkpoints()):
            if os.path.isfile(self.checkpoint_state(step)):
                return step
        return None

    def rotate(self, keep):
        """Deletes all but the newest `keep` step checkpoints (and their resume state)."""
        removed = []
        for step in self.checkpoints()[:-keep]:
            for path in (self.checkpoint(step), self.checkpoint_state(step)):
                if os.path.exists(path):
                    os.remove(path)
            removed.append(step)
        return removed

    def write_config(self, resolved):
        os.makedirs(self.path, exist_ok=True)
        write_json(self.file("config.json"), resolved)

    def read_metrics(self):
        if not os.path.isfile(self.metrics):
            return []
        with open(self.metrics, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def append_metrics(self, line):
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_metrics(self, after_step):
        """A resumed run rewrites the steps after its checkpoint; drop their old lines."""
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= after_step]
        os.makedirs(self.path, exist_ok=True)
        with open(self.metrics, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
