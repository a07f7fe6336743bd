"""The order of training: which images, at which bucket, make the batch of each step.

The plan is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
interrupted one would have seen, and several processes can each take their own share."""
import bisect
import random
from dataclasses import dataclass

from .buckets import bucket_size


@dataclass(frozen=True)
class Entry:
    image: int          # index into the scan's items
    size: tuple         # (width, height) bucket


def image_sizes(items, resolutions, multiple):
    """{image index: [bucket size per training resolution]} (duplicates collapse)."""
    return {i: list(dict.fromkeys(bucket_size(it.width, it.height, r, multiple) for r in resolutions))
            for i, it in enumerate(items)}


def regularization_entries(training_entries, ratio):
    """How many regularization entries an epoch of `training_entries` holds: `ratio` per training
    entry, at least one (0 when ratio is 0: no regularization images)."""
    return max(1, round(training_entries * ratio)) if ratio else 0


class BatchPlan:
    """`sizes` {image: bucket sizes} of the training images; `regularization` the same of the
    regularization images, of which each epoch takes `ratio` entries per training entry (1 is
    kohya's balance), going on through them epoch after epoch."""

    def __init__(self, sizes, repeats, batch_size, seed, regularization=None, ratio=1.0):
        self.sizes, self.repeats, self.batch_size, self.seed = sizes, repeats, batch_size, seed
        self.regularization, self.ratio = regularization or {}, ratio
        self._epochs = []  # cached batch lists, epoch by epoch
        self._starts = [0]  # stream position where each epoch starts (one more than _epochs)

    def epoch(self, number):
        while len(self._epochs) <= number:
            self._epochs.append(self._make_epoch(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        return self._epochs[number]

    def _make_epoch(self, number):
        rng = random.Random(self.seed * 100003 + number)
        entries = []
        for image, sizes in self.sizes.items():
            for repeat in range(self.repeats):
                # With several resolutions each image takes them in turn, epoch by epoch, so an
                # epoch still shows each image `repeats` times, as the guide's formula counts.
                entries.append(Entry(image, sizes[(number + repeat) % len(sizes)]))
        others = list(self.regularization)
        count = regularization_entries(len(entries), self.ratio) if others else 0
        for k in range(count):
            turn, place = divmod(number * count + k, len(others))  # turn: times through them so far
            sizes = self.regularization[others[place]]
            entries.append(Entry(others[place], sizes[turn % len(sizes)]))
        rng.shuffle(entries)
        by_size = {}
        for entry in entries:
            by_size.setdefault(entry.size, []).append(entry)
        batches = [group[i:i + self.batch_size] for group in by_size.values()
                   for i in range(0, len(group), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def epoch_of(self, position):
        """The epoch that holds `position` of the endless stream of batches."""
        while self._starts[-1] <= position:
            self.epoch(len(self._epochs))
        return bisect.bisect_right(self._starts, position) - 1

    def batch(self, position):
        """The batch at `position` of the endless stream of epochs."""
        number = self.epoch_of(position)
        return self.epoch(number)[position - self._starts[number]]
