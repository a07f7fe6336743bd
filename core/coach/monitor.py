"""Watches a training run and turns the signs of problems (docs/training-guide.md, section 5) into warnings.

The trainer calls on_log with each metrics line and on_samples with each set of sample images;
each returns a list of warnings (plain-language strings: what was seen, the likely cause, what
to try) for the log, progress and summary. Each sign is reported once per run."""
import os
import statistics

from PIL import Image

from ..config.guide import LR, LR_RANGE, exponent
from ..dataset.images import decode_upright, rgb
from . import loss_signs, sample_signs

MAX_TRAINING_IMAGES = 200   # enough to catch a copied image; bounded memory on huge datasets


class Monitor:
    """run: the RunFolder being trained, or None (a resumed run continues the curve of its
    metrics.jsonl and compares with its step-0 samples); training_images: the paths of the
    images the loop trains on (its scan), for the copied-image sign."""

    def __init__(self, run=None, training_images=()):
        self.run = run
        self.training_images = list(training_images)
        self.warnings = []
        self.losses = []            # (step, loss) of every metrics line
        self.validation = []        # (step, loss, validation_loss) of the lines that measured it
        self.spikes = []            # steps whose loss jumped
        self.judged = 0             # losses before this index are judged for jumps
        self.reported = set()       # signs already reported
        self.next_trend_check = loss_signs.MIN_TREND_LINES
        self.base = None            # Sampling of step 0: the base model's images
        self.changes = []           # (step, change from base) per later sampling
        self._training = None       # training images' signatures, loaded on demand
        self._training_names = []
        self._load_earlier_losses()

    def _load_earlier_losses(self):
        """A resumed run continues the curve of its first part (already judged for jumps)."""
        earlier = self.run.read_metrics() if self.run is not None else []
        self.losses = [(m["step"], m["loss"]) for m in earlier if loss_signs.finite(m.get("loss"))]
        self.validation = [(m["step"], m["loss"], m["validation_loss"]) for m in earlier
                           if loss_signs.finite(m.get("loss")) and loss_signs.finite(m.get("validation_loss"))]
        self.judged = len(self.losses)
        while self.next_trend_check <= len(self.losses):
            self.next_trend_check *= 2

    def _report(self, sign, message):
        if sign in self.reported:
            return []
        self.reported.add(sign)
        self.warnings.append(message)
        return [message]

    # -- metrics ------------------------------------------------------------------------------
    def on_log(self, line):
        step, loss = line.get("step"), line.get("loss")
        if not loss_signs.finite(loss):
            return self._report("nan", f"the loss logged at step {step} is {loss}: training has "
                                "diverged. Likely cause: a learning rate far too high, or fp16 "
                                f"overflow. Lower train.lr (the guide: {exponent(LR)}) or train in bf16/fp32, "
                                "and resume from the last good checkpoint.")
        self.losses.append((step, loss))
        found = self._check_spikes(final=False)
        if loss_signs.finite(line.get("validation_loss")):
            self.validation.append((step, loss, line["validation_loss"]))
            found += self._check_overfitting()
        if len(self.losses) >= self.next_trend_check:
            self.next_trend_check *= 2  # a check at 20, 40, 80... lines: cheap and not repetitive
            found += self._check_trend()
        return found

    def _check_spikes(self, final):
        """Judges each value once it has SPIKE_HALF_WINDOW values after it (all left at the end)
        and the curve is long enough to measure its noise."""
        values = [value for _, value in self.losses]
        last = len(values) if final else len(values) - loss_signs.SPIKE_HALF_WINDOW
        if len(values) < loss_signs.MIN_SPIKE_LINES:
            return []
        found = []
        for index in range(self.judged, max(self.judged, last)):
            if loss_signs.is_spike(values, index):
                step = self.losses[index][0]
                self.spikes.append(step)
                found += self._report("spike", f"the loss jumped at step {step} to "
                                      f"{values[index]:.4g}, far above the values around it "
                                      f"(about {_median_around(values, index):.4g}). Likely "
                                      "cause: a learning rate too high, or a bad image or "
                                      "caption. If jumps repeat, lower train.lr (the guide's range "
                                      f"is {LR_RANGE}) and check the dataset report.")
        self.judged = max(self.judged, last)
        return found

    def _check_trend(self):
        values = [value for _, value in self.losses]
        if not loss_signs.not_going_down(values):
            return []
        start, end, t = loss_signs.trend(values)
        first, last = self.losses[0][0], self.losses[-1][0]
        seen = (f"between steps {first} and {last} (mean {start:.4g} at the start, {end:.4g} "
                "over the last third)")
        if t < -loss_signs.FLAT_T:
            return self._report("flat", f"the loss went up {seen}. Likely cause: a learning rate "
                                f"too high. Lower train.lr (the guide's range is {LR_RANGE}) "
                                "or use an earlier checkpoint.")
        moved = max((change for _, change in self.changes), default=0.0)
        if moved >= sample_signs.VISIBLE_CHANGE:  # the samples say the LoRA learns regardless
            return self._report("flat", f"the loss has not gone down {seen}, but the samples do "
                                f"change (up to {moved:.0f} of 255 from the base model's), so the "
                                "LoRA is learning: a FLUX LoRA's loss often stays level. Judge the "
                                "run by its samples; if they do not improve, try a higher train.lr "
                                f"within {LR_RANGE}.")
        return self._report("flat", f"the loss has not gone down {seen}: the change is within "
                            "the noise. Likely cause: a learning rate too low (or 0) for the LoRA "
                            f"to learn. Try train.lr in {LR_RANGE}, and check whether the "
                            "samples change.")

    def _check_overfitting(self):
        if "overfitting" in self.reported:
            return []
        seen = loss_signs.overfitting([t for _, t, _ in self.validation], [v for _, _, v in self.validation])
        if seen is None:
            return []
        best, recent, then, now = seen
        step, lowest = self.validation[best][0], self.validation[best][2]
        return self._report("overfitting", f"the validation loss (on the held-out images) was lowest "
                            f"at step {step} ({lowest:.4g}) and has risen since (mean {recent:.4g} "
                            f"lately), while the training loss kept falling ({then:.4g} then, "
                            f"{now:.4g} lately): overfitting, the LoRA memorises its training images "
                            f"instead of learning what they share. {self._keep_advice(step)} "
                            "Next time, train fewer steps, lower train.lr or add varied images.")

    def _keep_advice(self, step):
        """Which saved step checkpoint to keep: the one nearest `step` (the earlier of two)."""
        saved = self.run.checkpoints() if self.run is not None else []
        if not saved:
            return (f"No step checkpoint is saved yet; lower save.save_every to keep one near step "
                    f"{step}.")
        keep = min(saved, key=lambda s: (abs(s - step), s))
        return (f"Keep the checkpoint of step {keep}, the saved one nearest step {step} "
                f"({os.path.basename(self.run.checkpoint(keep))}); `loralab runs pin {self.run.path} "
                f"{keep}` keeps it out of rotation.")

    # -- samples ------------------------------------------------------------------------------
    def on_samples(self, step, images):
        sampling = sample_signs.Sampling(step, images)
        if step == 0 or self.base is None:
            if step == 0:
                self.base = sampling
                return []
            self.base = self._saved_base(len(images))  # a resumed run: its step-0 samples on disk
            if self.base is None:
                return []
        found = []
        change = sample_signs.change_from_base(sampling, self.base)
        self.changes.append((step, change))
        if sample_signs.unchanged([c for _, c in self.changes]):
            steps = ", ".join(str(s) for s, _ in self.changes)
            found += self._report("unchanged", f"the samples at steps {steps} look the same as the "
                                  f"base model's (at most {max(c for _, c in self.changes):.2f} of "
                                  "255 apart on average): the LoRA is not learning. Likely cause: "
                                  "train.lr is 0 or far too low, or too few steps. Try train.lr "
                                  f"{LR_RANGE}.")
        collapsed = sample_signs.prompts_collapsed(sampling, self.base)
        if collapsed:
            now, then = collapsed
            found += self._report("prompts", f"at step {step} the samples of different prompts "
                                  f"look nearly the same (they differ by {now:.1f} of 255, the base "
                                  f"model's by {then:.1f}): the LoRA overrides the prompt. Likely "
                                  "cause: overfitting (too many steps or too high a learning rate "
                                  "for the dataset, or captions that are all alike). Use an earlier "
                                  "checkpoint, fewer steps or a lower train.lr, and vary captions.")
        copied = sample_signs.memorized(sampling, self.base, self._training_arrays())
        if copied:
            prompt, index, now, then = copied
            found += self._report("memorized", f"at step {step} the sample of prompt {prompt + 1} "
                                  f"is nearly a copy of training image {self._training_names[index]} "
                                  f"({now:.1f} of 255 apart; the base sample was {then:.1f}): "
                                  "overfitting. Likely cause: too many steps for the dataset, too "
                                  "few or too similar images. Use an earlier checkpoint, fewer steps "
                                  "or a lower train.lr, and add varied images.")
        ratio = sample_signs.sharpness_ratio(sampling, self.base)
        if ratio < sample_signs.BLURRY_RATIO:
            found += self._report("blurry", f"at step {step} the samples are much blurrier than the "
                                  f"base model's (fine detail {ratio:.0%} of the base). Likely "
                                  "cause: blurry or small training images, or a learning rate too "
                                  "high. Check the dataset report, lower train.lr, or use an "
                                  "earlier checkpoint.")
        elif ratio > sample_signs.NOISY_RATIO:
            found += self._report("noisy", f"at step {step} the samples are much noisier than the "
                                  f"base model's (fine detail {ratio:.1f}x the base). Likely cause: "
                                  "a learning rate too high, or noisy training images. Lower "
                                  "train.lr, or use an earlier checkpoint.")
        return found

    def _saved_base(self, count):
        if self.run is None:
            return None
        folder = self.run.samples(0)
        paths = [os.path.join(folder, f"{index:02d}_s1.png") for index in range(count)]
        if not all(os.path.isfile(p) for p in paths):
            return None
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return sample_signs.Sampling(0, images)

    def _training_arrays(self):
        """The training images' signatures (loaded once; an image that cannot be read is left out)."""
        if self._training is None:
            self._training = []
            stride = max(1, len(self.training_images) // MAX_TRAINING_IMAGES)
            for path in self.training_images[::stride][:MAX_TRAINING_IMAGES]:
                try:  # upright as trained (EXIF orientation applied), or a phone photo compares sideways
                    signature = sample_signs.training_signature(rgb(decode_upright(path)))
                except (OSError, ValueError):
                    continue
                self._training.append(signature)
                self._training_names.append(os.path.basename(path))
        return self._training

    # -- end of the run -----------------------------------------------------------------------
    def finish(self):
        found = self._check_spikes(final=True)
        found += [] if "flat" in self.reported else self._check_trend()
        if len(self.spikes) > 1:
            shown = ", ".join(str(s) for s in self.spikes[:8]) + (", ..." if len(self.spikes) > 8 else "")
            message = (f"the loss jumped {len(self.spikes)} times in all (steps {shown}). Repeated "
                       "jumps mean training is unstable: lower train.lr, keep train.batch_size 1 "
                       "and check the dataset for odd images or captions.")
            self.warnings.append(message)
            found.append(message)
        return found


def _median_around(values, index):
    half = loss_signs.SPIKE_HALF_WINDOW
    return statistics.median(values[max(0, index - half):index] + values[index + 1:index + 1 + half])
