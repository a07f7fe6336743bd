"""The training guide's numbers (docs/training-guide.md), each written once here: the schema's
defaults and descriptions, the step formulas (plan.py), the coach's advice and its warnings read
them."""


def exponent(value):
    """A learning rate as the guide writes it: 1e-4, not 0.0001 or 1e-04."""
    mantissa, power = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(power)}"


LR = 1e-4                                 # the guide's default
LR_BAND = (1e-4, 8e-4)                    # "optimal range"
LR_RANGE = f"{exponent(LR_BAND[0])} to {exponent(LR_BAND[1])}"
RANK = 16
RANK_BAND, RANK_RECOMMENDED = (4, 32), (16, 32)   # "depending on memory"; "most cases"
RANK_SHORT_MEMORY = (4, 8)                # "when memory is short"
RESOLUTION_BAND = (512, 1024)             # "(depends on the originals)"
MIN_IMAGES, GOOD_IMAGES = 15, 20          # "at least ... images for good results"
# The steps table, (up to this many images, low, high steps); above the last, its high and up.
# The recommended steps there add STEPS_PER_IMAGE_ABOVE per image, up to MAX_RECOMMENDED_STEPS.
STEP_BANDS = ((20, 1000, 1500), (50, 1500, 2500))
STEPS_PER_IMAGE_ABOVE, MAX_RECOMMENDED_STEPS = 20, 6000


def band(low_high):
    """A (low, high) band as the guide writes it: "low-high"."""
    return f"{low_high[0]}-{low_high[1]}"
