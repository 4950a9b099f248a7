"""A labelled fraction of a training split: the records a run may learn from when only some
labels are at hand (DeiT's data-efficiency question: does a teacher stand in for the rest?).

The choice is stratified and fixed by a seed: each class keeps `max(1, round(fraction * n_c))`
of its `n_c` records, the first ones of a permutation drawn from `(seed, class)` alone, so a
class's pick does not depend on the other classes, and with one seed a smaller fraction is a
subset of a larger one (10% of the images are among the 25%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deit.data.sources import RecordSource
from deit.errors import InputError

_SUBSET_TAG = 0x5B5E7  # keeps these draws apart from the epoch orders of the same seed


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted record indices: per class `max(1, round(fraction * n_c))` of its records."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"label_fraction {fraction}; expected a fraction in (0, 1]")
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(members)))
        rng = np.random.default_rng([seed, int(c), _SUBSET_TAG])
        keep.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclass
class Subset:
    """Records `indices` of `source` as a source of their own, each `repeats` times (pickles as
    the source and the indices, so grain workers read it as they read the source)."""

    source: RecordSource
    indices: np.ndarray
    repeats: int = 1

    def __post_init__(self) -> None:
        self.picked = np.asarray(self.indices, np.int64)
        self.indices = np.tile(self.picked, self.repeats)
        self.classes: list[str] = self.source.classes
        self._labels = np.asarray(self.source.labels, np.int32)[self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> np.ndarray:
        return self.source.load(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))


def describe(subset: Subset, fraction: float, seed: int) -> str:
    """One line: how many records of how many were kept, the fewest and most per class."""
    counts = np.bincount(subset.labels[: len(subset.picked)], minlength=len(subset.classes))
    again = f", each {subset.repeats} times per epoch" if subset.repeats > 1 else ""
    return (
        f"label_fraction {fraction:g} (subset_seed {seed}): {len(subset.picked):,} of "
        f"{len(subset.source):,} training images, {counts.min()}-{counts.max()} per class{again}"
    )
