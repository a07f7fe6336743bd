"""Signs in the loss curve (docs/training-guide.md, section 5: "loss that does not go down, or jumps a
lot", and a validation loss that rises while the training loss falls), as pure functions of the
logged loss values so they can be tested on made-up sequences.

A flow-matching loss is noisy: each step draws its own noise level, so single values swing.
Both signs are therefore judged in units of the curve's own noise: the typical change from one
logged value to the next (robust: the median, so jumps and trends hardly move it)."""
import math
import statistics

MIN_TREND_LINES = 20   # fewer logged values cannot tell a slow fall from noise
FLAT_T = 2.5           # the start-to-end fall must exceed 2.5 standard errors
SPIKE_HALF_WINDOW = 10  # a value is judged against the 10 values before and the 10 after it
MIN_SPIKE_LINES = 20   # the noise is measured on at least 20 values: a few early swings skew it
SPIKE_NOISE = 6.0      # 6 noise units above the values around it ...
SPIKE_RISE = 0.3       # ... and 30% above them, and above the value before it
OVERFIT_LINES = 8      # validation values needed before a rise is judged ...
OVERFIT_AFTER = 4      # ... at least this many after the lowest one
OVERFIT_T = 5.0        # the recent mean must be 5 standard errors above the lowest value


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def noise(values):
    """Standard deviation of one value's noise, from the median change between neighbours."""
    changes = [abs(b - a) for a, b in zip(values, values[1:])]
    return 1.4826 * statistics.median(changes) / math.sqrt(2) if changes else 0.0


def trend(values):
    """(start, end, t): mean of the first sixth (at least 3 values), mean of the last third, and
    the fall from start to end in standard errors. t > 2.5: clearly down; t < -2.5: clearly up.
    The start is short so a quick early fall followed by a plateau counts as going down."""
    head, tail = max(3, len(values) // 6), max(3, len(values) // 3)
    start, end = statistics.fmean(values[:head]), statistics.fmean(values[-tail:])
    error = noise(values) * math.sqrt(1 / head + 1 / tail)
    if error == 0:
        return start, end, (0.0 if start == end else math.copysign(math.inf, start - end))
    return start, end, (start - end) / error


def not_going_down(values):
    """True when enough values are logged and the loss has not clearly fallen."""
    values = [v for v in values if finite(v)]
    return len(values) >= MIN_TREND_LINES and trend(values)[2] < FLAT_T


def is_spike(values, index):
    """True when values[index] jumps far above the values around it: judged against the median
    of up to SPIKE_HALF_WINDOW values on each side, in units of the whole curve's noise."""
    if index == 0 or len(values) < MIN_SPIKE_LINES:
        return False  # the first value has nothing to jump from
    value = values[index]
    around = values[max(0, index - SPIKE_HALF_WINDOW):index] + values[index + 1:index + 1 + SPIKE_HALF_WINDOW]
    level, scale = statistics.median(around), noise(values)
    return (value > values[index - 1] and value > level * (1 + SPIKE_RISE)
            and value - level > SPIKE_NOISE * scale)


def overfitting(training, validation):
    """The validation loss clearly risen from its lowest value while the training loss went down:
    (index of the lowest validation value, recent validation mean, training mean up to that index,
    recent training mean), else None. `training` and `validation` are the losses of the same
    metrics lines. "Recent" is the last half of the values after the lowest (at least
    OVERFIT_AFTER); the rise is judged in standard errors of the validation curve's own noise,
    which counts its lowest value as one noisy value (so a minimum that noise dug out is not
    enough). The training loss only has to be lower recently than up to the lowest validation
    value: it is far noisier, and what sets overfitting apart from a diverging run (both rise) is
    its direction."""
    if len(validation) < OVERFIT_LINES:
        return None
    best = min(range(len(validation)), key=validation.__getitem__)
    after = len(validation) - best - 1
    if after < OVERFIT_AFTER:
        return None
    count = max(OVERFIT_AFTER, after // 2)
    recent = statistics.fmean(validation[-count:])
    error = noise(validation) * math.sqrt(1 + 1 / count)
    rise = recent - validation[best]
    if rise <= 0 or (error > 0 and rise / error < OVERFIT_T):
        return None
    then = statistics.fmean(training[max(0, best + 1 - count):best + 1])
    now = statistics.fmean(training[-count:])
    return (best, recent, then, now) if now < then else None
