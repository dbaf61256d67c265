"""Aspect-ratio buckets (kohya's `enable_bucket`): train on wide and tall images at batch sizes above 1 without
cropping them to a square.

Each image goes to the bucket (a width x height of about the training size's area, sides a multiple of `step`) whose
aspect ratio is closest to its own, and is resized to cover it and center-cropped (so little is cut). A batch holds
images of one bucket only, since a batch is one tensor. Which images form the batches of an epoch, and their order,
depend only on (seed, epoch): a resumed run takes the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

MIN_SIDE_FRACTION = 0.5  # the narrowest side a bucket may have, as a fraction of the training size's square side


def bucket_step(width: int, height: int) -> int:
    """The multiple bucket sides are rounded to: 64 px as kohya (SD's UNet downsamples latents 3 times), 8 px for
    training sizes under 256 px (the tiny shapes models), where 64 px steps would leave one or two buckets."""
    return 64 if min(width, height) >= 256 else 8


def bucket_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """Every (width, height) bucket for a training size: for each width (a multiple of the step) the largest height
    whose area stays within width x height; sides from half to twice the square side, portrait and landscape."""
    step = bucket_step(width, height)
    area = width * height
    side = math.sqrt(area)
    smallest = max(step, int(side * MIN_SIDE_FRACTION) // step * step)
    largest = int(side * 2) // step * step
    sizes = {(width, height)}  # the size asked for is always a bucket
    for w in range(smallest, largest + 1, step):
        h = min(largest, area // w // step * step)
        if h >= smallest:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to that of `size` (w, h); of equal ones, the larger area."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def epoch_batches(sizes: list[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: image indices grouped by size (bucket), shuffled within each group, cut into batches
    of `batch_size` (a group's last batch may be smaller), then the batches shuffled. Every image once per epoch."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        groups[size].append(index)
    rng = random.Random(seed * 100_003 + epoch)
    batches = []
    for size in sorted(groups):
        members = groups[size]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


class BucketSchedule:
    """Which images each micro-batch of a step takes, when batches come from buckets: the epochs' batch lists read
    as one stream, `per_step` batches per step (gradient accumulation)."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int, per_step: int):
        self.sizes, self.batch_size, self.seed, self.per_step = sizes, batch_size, seed, per_step
        self.batches_per_epoch = len(epoch_batches(sizes, batch_size, seed, 0))
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.sizes, self.batch_size, self.seed, epoch))
        return self._epoch[1]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """(image index, epoch) of each sample, one list per micro-batch of `step`."""
        out = []
        for position in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, offset = divmod(position, self.batches_per_epoch)
            out.append([(index, epoch) for index in self._batches(epoch)[offset]])
        return out

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // self.per_step)
