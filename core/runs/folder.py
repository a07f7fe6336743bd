"""The run folder (docs/architecture.md, "Run folder"): <output_dir>/<name>/ with config.json,
metrics.jsonl, step checkpoints <name>_<step 9 digits>.safetensors (each with its resume state
.state.safetensors + .state.json), the final <name>.safetensors, samples/, loss.png, pins.json
(steps kept out of rotation) and .lock (held by the training that uses the folder).

One run folder holds one training: core/runs/identity.py picks the folder for a config."""
import contextlib
import json
import os
import re

from safetensors import SafetensorError, safe_open

from .. import UserError
from ..io import UnreadableFile, append_line, atomic_path, open_fd, open_regular, read_checked_json, write_json
from ..io.atomic import TEMPORARY
from ..io.paths import schema_problem
from .schemas import METRICS_LINE, PINNED_STEP, PINS, RUN_CONFIG, WARNINGS

LOCK_FILE = ".lock"


class RunLocked(UserError, RuntimeError):
    """Another process is training in this run folder."""


# safetensors' save_file writes through its own `.tmpXXXXXX` beside the target; a kill leaves it
LIBRARY_TEMPORARY = re.compile(r"^\.tmp[0-9A-Za-z]{6}$")


class RunFolder:
    def __init__(self, output_dir, name):
        self.name = name
        self.path = os.path.join(os.path.abspath(os.path.expanduser(output_dir)), name)
        self._step_file = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
        self._state_file = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.state\.(safetensors|json)$")
        self.metrics_problem = None  # why read_metrics dropped lines (a torn last line), or None
        self.pins_problem = None     # why pinned() dropped entries of pins.json, or None
        self.problems = []           # "damaged: ..." lines of config.json or warnings.json read
        self.identity = None         # set by identity.choose_run_folder; write_config stores them
        self.started_because = None
        self._lock_handle = None

    def file(self, *parts):
        return os.path.join(self.path, *parts)

    @property
    def final_lora(self):
        return self.file(f"{self.name}.safetensors")

    @property
    def metrics(self):
        return self.file("metrics.jsonl")

    @property
    def config_path(self):
        return self.file("config.json")

    def checkpoint(self, step):
        return self.file(f"{self.name}_{step:09d}.safetensors")

    def checkpoint_state(self, step):
        """The resume state's tensors (fp32 LoRA weights, optimizer tensors)."""
        return self.file(f"{self.name}_{step:09d}.state.safetensors")

    def checkpoint_state_json(self, step):
        """The resume state's other values (step, scheduler, optimizer param groups)."""
        return self.file(f"{self.name}_{step:09d}.state.json")

    def legacy_checkpoint_state(self, step):
        """Resume state of earlier versions: a pickle, never loaded (it could run any code)."""
        return self.file(f"{self.name}_{step:09d}.state.pt")

    def has_final_lora(self):
        """Whether the final LoRA is there and reads as a safetensors file with tensors: a 0-byte,
        torn or linked one does not make the run finished."""
        if os.path.islink(self.final_lora) or not os.path.isfile(self.final_lora):
            return False
        try:
            with safe_open(self.final_lora, framework="numpy") as f:
                return bool(list(f.keys()))
        except (SafetensorError, OSError, ValueError):
            return False

    def samples(self, step):
        return self.file("samples", f"{step:09d}")

    def checkpoints(self):
        """Steps of the step checkpoints on disk, oldest first."""
        if not os.path.isdir(self.path):
            return []
        steps = [int(m.group(1)) for m in map(self._step_file.match, os.listdir(self.path)) if m]
        return sorted(steps)

    def has_state(self, step):
        return os.path.isfile(self.checkpoint_state(step)) and os.path.isfile(self.checkpoint_state_json(step))

    def resumable(self):
        """Newest step whose LoRA file and resume state are all on disk, or None (whether the
        state loads is checked by core.trainer.checkpoints.load_resume_state)."""
        for step in reversed(self.checkpoints()):
            if self.has_state(step):
                return step
        return None

    # -- pins: step checkpoints kept out of rotation ------------------------------------------------

    @property
    def pins_path(self):
        return self.file("pins.json")

    def pinned(self):
        """Steps pinned with `loralab runs pin`, ascending. An entry that is no step number is
        dropped and named in `pins_problem`; pins.json that cannot be read at all raises
        UnreadableFile (then no one knows what is pinned, so rotate() deletes nothing)."""
        self.pins_problem = None
        if not os.path.lexists(self.pins_path):
            return []
        entries = read_checked_json(self.pins_path, PINS)["steps"]
        bad = [entry for entry in entries if schema_problem(entry, PINNED_STEP)]
        if bad:
            self.pins_problem = (f"{self.pins_path}: entries {', '.join(json.dumps(b)[:40] for b in bad)} "
                                 "are not step numbers and were dropped; the other pins are kept")
        return sorted({entry for entry in entries if entry not in bad})

    def pin(self, step, pinned=True):
        """Keeps (or, pinned=False, releases) the step checkpoint `step` out of rotation."""
        if pinned and not os.path.isfile(self.checkpoint(step)):
            raise FileNotFoundError(f"{self.checkpoint(step)} does not exist: no step {step} checkpoint "
                                    f"in {self.path} (its steps: {self.checkpoints() or 'none'})")
        steps = set(self.pinned())
        steps = steps | {step} if pinned else steps - {step}
        write_json(self.pins_path, {"steps": sorted(steps)})
        return sorted(steps)

    def rotate(self, keep):
        """Deletes all but the newest `keep` unpinned step checkpoints (with their resume state);
        pinned steps are never deleted and do not count towards `keep`."""
        try:
            pinned = set(self.pinned())
        except UnreadableFile as error:
            self.pins_problem = f"{error}; no checkpoint is rotated away until it is fixed"
            return []
        unpinned = [step for step in self.checkpoints() if step not in pinned]
        removed = []
        for step in unpinned[:-keep] if keep > 0 else unpinned:
            # the LoRA file first: without it the checkpoint no longer counts, whatever is left
            for path in (self.checkpoint(step), self.checkpoint_state(step),
                         self.checkpoint_state_json(step), self.legacy_checkpoint_state(step)):
                if os.path.exists(path):
                    os.remove(path)
            removed.append(step)
        return removed

    # -- config ---------------------------------------------------------------------------------

    def write_config(self, resolved):
        """Writes config.json; the identity and the reason this folder was started (both set by
        identity.choose_run_folder) go with it, so a later run can tell whether it is this one."""
        os.makedirs(self.path, exist_ok=True)
        extra = {}
        if self.identity is not None:
            extra["identity"] = self.identity
        if self.started_because is not None:
            extra["started_because"] = self.started_because
        elif os.path.isfile(self.config_path):  # a resumed run keeps the reason it was started for
            reason = (self.read_config() or {}).get("started_because")  # None when damaged
            if reason:
                extra["started_because"] = reason
        write_json(self.config_path, {**resolved, **extra})

    def read_config(self):
        """config.json as a dict, or None when missing, a link, or not the shape we write (the
        reason is added to `problems`)."""
        return self._read_checked(self.config_path, RUN_CONFIG, None)

    def read_warnings(self):
        """warnings.json's warnings, or [] when missing or damaged (named in `problems`)."""
        return self._read_checked(self.file("warnings.json"), WARNINGS, [])

    def _read_checked(self, path, schema, missing):
        if not os.path.lexists(path):
            return missing
        try:
            return read_checked_json(path, schema)
        except (UnreadableFile, OSError) as error:
            reason = str(error) if str(error).startswith("damaged") else f"damaged: {error}"
            if reason not in self.problems:
                self.problems.append(reason)
            return missing

    # -- metrics --------------------------------------------------------------------------------

    def read_metrics(self):
        """The metrics lines. A line that does not parse (a kill or power cut mid-append tears the
        last one) or lacks a step number or has a non-number value is dropped, and
        `metrics_problem` says which, for the trainer to warn about."""
        self.metrics_problem = None
        if not os.path.lexists(self.metrics):
            return []
        lines, bad = [], []
        try:
            with open_regular(self.metrics) as f:
                for number, raw in enumerate(f, 1):
                    text = raw.decode("utf-8", errors="replace")
                    if not text.strip():
                        continue
                    try:
                        line = json.loads(text)
                    except (ValueError, RecursionError):
                        bad.append(f"line {number} (not JSON)")
                        continue
                    problem = schema_problem(line, METRICS_LINE)
                    if problem:
                        bad.append(f"line {number} ({problem})")
                    else:
                        lines.append(line)
        except (UnreadableFile, OSError) as error:
            self.metrics_problem = f"damaged: {error}"
            return []
        if bad:
            self.metrics_problem = (f"damaged: {self.metrics}: {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                                    "could not be read (cut short when a run was killed?) and "
                                    "dropped; the other metrics lines are kept.")
        return lines

    def append_metrics(self, line):
        os.makedirs(self.path, exist_ok=True)
        if os.path.isfile(self.metrics) and os.path.getsize(self.metrics):
            with open_regular(self.metrics) as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # keep a torn line from swallowing this one
                append_line(self.metrics, "")
        append_line(self.metrics, json.dumps(line))

    def truncate_metrics(self, after_step):
        """A resumed run rewrites the steps after its checkpoint; drop their old lines (and any
        torn line). Returns the warning about dropped lines, or None."""
        kept = [m for m in self.read_metrics() if m["step"] <= after_step]
        os.makedirs(self.path, exist_ok=True)
        with atomic_path(self.metrics) as temporary:
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(m) + "\n" for m in kept)
        return self.metrics_problem

    # -- temporaries and the lock ---------------------------------------------------------------------

    def clean_temporaries(self):
        """Removes the temporaries of our own writes that a kill left at the run's top level and in
        the folders the run writes into (cache/, samples/<step>/), never through a link; call
        it while holding lock(), so no live write loses its file. Returns the removed paths."""
        removed = []
        for folder in [self.path, self.file("cache"),
                       *(entry.path for entry in _entries(self.file("samples")) if entry.name.isdigit())]:
            removed += [entry.path for entry in _entries(folder) if entry.is_file(follow_symlinks=False)
                        and (TEMPORARY.match(entry.name) or LIBRARY_TEMPORARY.match(entry.name))]
        # resume state of a save killed before its LoRA file (which marks a checkpoint complete),
        # or of a rotation killed after deleting it: never resumable, so never rotated either
        listed = set(self.checkpoints())
        for name in os.listdir(self.path) if os.path.isdir(self.path) else []:
            match = self._state_file.match(name)
            if match and int(match.group(1)) not in listed:
                removed.append(self.file(name))
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return removed

    def locked_by(self):
        """The pid recorded in the lock file, or None."""
        try:
            with open_regular(self.file(LOCK_FILE), max_bytes=64) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):  # UnreadableFile is a ValueError
            return None

    @contextlib.contextmanager
    def lock(self):
        """Holds the run folder for one training: a second process (or a second lock() in this
        one) gets RunLocked naming the folder and the holder's pid. The operating system drops
        the lock when its holder exits, killed or not, so a crash never leaves it stuck."""
        os.makedirs(self.path, exist_ok=True)
        try:  # never through a link: a .lock link would have its target truncated
            fd = open_fd(self.file(LOCK_FILE), os.O_RDWR | os.O_CREAT, mode=0o644)
        except UnreadableFile as error:
            raise RunLocked(f"the run folder's lock cannot be taken: {error}. Remove it if no "
                            "training uses the folder.") from None
        handle = os.fdopen(fd, "r+", encoding="utf-8")
        try:
            if not _try_lock(handle):
                pid = self.locked_by()
                raise RunLocked(f"the run folder {self.path} is in use by another training "
                                f"(process {pid if pid else 'unknown'}): two trainings must not write "
                                "one run folder. Wait for it to finish or stop it, or give this run "
                                "another name.")
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._lock_handle = handle
            yield self
        finally:
            if self._lock_handle is handle:
                self._lock_handle = None
                with contextlib.suppress(OSError):
                    handle.seek(0)
                    handle.truncate()
                    handle.flush()
                _unlock(handle)
            handle.close()


def _entries(folder):
    """os.scandir(folder) as a list, [] when it is missing, not a folder, or a link."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return list(entries)


if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(handle):
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(handle):
        handle.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(handle):
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(handle):
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
