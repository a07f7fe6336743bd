"""Signs in the sample images (docs/training-guide.md, section 5): samples that stay the base model's, samples
of different prompts that become one image, samples that turn into a training image, samples that
blur or fill with noise. Pure functions of images and numbers, so they test on made-up images.

Every sign is judged against the base model's samples (step 0, same prompts and seeds): a
property the base model already has is not something the LoRA did."""
import itertools
import statistics

from .images import COMPARE_SIZE, comparable, difference, sharpness

UNCHANGED_LIMIT = 1.0        # mean |difference| to the base samples, 0..255: below it, unchanged
VISIBLE_CHANGE = 5.0         # samples this far from the base show that the LoRA learns
MIN_UNCHANGED_SAMPLINGS = 2  # at this many samplings after the base, all unchanged: not learning
DISTINCT_PROMPTS_MIN = 8.0   # base samples of different prompts must differ this much to judge
COLLAPSE_FRACTION = 0.25     # prompts collapse when their samples differ 4x less than at base
COARSE_SIZE = 32             # copying is judged on composition and colour, not on fine detail
MEMORIZED_LIMIT = 15.0       # a sample this close to a training image copies it, if the base
MEMORIZED_FRACTION = 0.5     # sample was not that close and the sample is twice as close as it
BLURRY_RATIO = 0.25          # sharpness below a quarter of the base samples': blurry
NOISY_RATIO = 4.0            # above four times: noisy


def coarse(array):
    """A comparable array averaged down to COARSE_SIZE: layout and colours, no detail."""
    block = COMPARE_SIZE // COARSE_SIZE
    return array.reshape(COARSE_SIZE, block, COARSE_SIZE, block, -1).mean(axis=(1, 3))


def training_signature(image):
    """What a training image is compared by, against each sample's `coarse` arrays."""
    return coarse(comparable(image))


class Sampling:
    """The measurements of one sampling: one image per prompt, in prompt order."""

    def __init__(self, step, images):
        self.step = step
        self.arrays = [comparable(image) for image in images]
        self.coarse = [coarse(array) for array in self.arrays]
        self.sharpness = [sharpness(image) for image in images]

    def prompt_spread(self):
        """Mean difference between the samples of different prompts (None with one prompt)."""
        pairs = list(itertools.combinations(self.arrays, 2))
        return statistics.fmean(difference(a, b) for a, b in pairs) if pairs else None

    def nearest(self, training):
        """[(distance, training index)] of each sample's nearest training image (training:
        training_signature arrays)."""
        return [min((difference(a, t), i) for i, t in enumerate(training)) for a in self.coarse]


def change_from_base(sampling, base):
    """Largest mean difference of a sample from the base sample of the same prompt."""
    return max(difference(a, b) for a, b in zip(sampling.arrays, base.arrays))


def unchanged(changes):
    """True when the samplings after the base all look like the base (`changes` from
    change_from_base, one per sampling) and there have been enough of them to say so."""
    return len(changes) >= MIN_UNCHANGED_SAMPLINGS and max(changes) < UNCHANGED_LIMIT


def prompts_collapsed(sampling, base):
    """(now, at base) spreads when samples of different prompts became nearly one image."""
    now, then = sampling.prompt_spread(), base.prompt_spread()
    if now is None or then < DISTINCT_PROMPTS_MIN:
        return None
    return (now, then) if now < COLLAPSE_FRACTION * then else None


def memorized(sampling, base, training):
    """(prompt index, training index, distance, base distance) of a sample that copies a training
    image, or None."""
    if not training:
        return None
    pairs = zip(sampling.nearest(training), base.nearest(training))
    for prompt, ((now, index), (then, _)) in enumerate(pairs):
        if then >= MEMORIZED_LIMIT and now < min(MEMORIZED_LIMIT, MEMORIZED_FRACTION * then):
            return prompt, index, now, then
    return None


def sharpness_ratio(sampling, base):
    """Median over prompts of sharpness now / sharpness at base."""
    ratios = [now / then for now, then in zip(sampling.sharpness, base.sharpness) if then > 0]
    return statistics.median(ratios) if ratios else 1.0
