"""LoRA strengths a user gives: SampleGrid's list and ApplyLoRA's widget. Each is a finite number
in STRENGTH_RANGE (beyond it a LoRA only adds noise, and inf or NaN make every pixel NaN), and a
grid has at most MAX_STRENGTHS columns (each one generates every prompt). No torch here: the
nodes read the range to declare their widgets."""
import math

STRENGTH_RANGE = (-10.0, 10.0)
MAX_STRENGTHS = 16
EXAMPLE = "give numbers separated by commas, e.g. 0,0.5,1"


def _shown(text, limit=60):
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_strengths(strengths, name="strengths"):
    """Raises ValueError naming the input `name` unless `strengths` are 1 to MAX_STRENGTHS finite
    numbers within STRENGTH_RANGE."""
    low, high = STRENGTH_RANGE
    if not 1 <= len(strengths) <= MAX_STRENGTHS:
        raise ValueError(f"{name}: {len(strengths)} strengths; a grid takes 1 to {MAX_STRENGTHS}")
    for strength in strengths:
        if not (math.isfinite(strength) and low <= strength <= high):
            raise ValueError(f"{name}: {strength} is not a number from {low:g} to {high:g}; {EXAMPLE}")


def parse_strengths(text, name="strengths"):
    """SampleGrid's strengths, "0,0.5,1", as numbers; ValueError naming `name` otherwise."""
    try:
        strengths = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        strengths = []
    if not strengths:
        raise ValueError(f"{name} = {_shown(text)}: {EXAMPLE}")
    try:
        check_strengths(strengths, f"{name} = {_shown(text)}")
    except ValueError as error:
        raise ValueError(str(error)) from None
    return strengths
