"""What a data set looks like before a recipe is chosen for it: how many training images, how
many classes, how large the images typically are (`survey`). The `small` recipe is derived
from it (`recipes.small`), and `deit train --data FOLDER` picks that recipe for a folder with
few or small images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from deit.data.config import DataConfig
from deit.errors import InputError

SAMPLED_IMAGES = 16  # decoded to find the typical size: evenly spread over the training split
# A folder with fewer training images than this, or images with a shorter side below SMALL_SIDE,
# gets the `small` recipe by default: the paper's ImageNet recipe would train DeiT-Ti at 224 px
# with batch 1024 for 300 epochs (days on a CPU, and no step at all below 1,024 images).
SMALL_COUNT = 10_000
SMALL_SIDE = 112


@dataclass(frozen=True)
class DataSurvey:
    """A data set's size: `train_images`, `classes`, and `side`, the median shorter side (px)
    of a few training images; `channels`, 1 when every sampled image is grey (stored as RGB or
    not), else 3; `balance`, the smallest class's training images over the largest's;
    `dataset` as given."""

    dataset: str
    train_images: int
    classes: int
    side: int
    channels: int = 3
    balance: float = 1.0

    def describe(self) -> str:
        """`3,000 training images (under 10,000) of ~28 px, grey, 10 classes, balanced`."""
        few = self.train_images < SMALL_COUNT
        tiny = self.side < SMALL_SIDE
        balanced = (
            "balanced" if self.balance >= 0.8 else f"smallest class {self.balance:.0%} of largest"
        )
        return (
            f"{self.train_images:,} training images{' (under 10,000)' if few else ''} of "
            f"~{self.side} px{' (under 112)' if tiny else ''}, "
            f"{'grey' if self.channels == 1 else 'colour'}, {self.classes} classes, {balanced}"
        )

    @property
    def small(self) -> bool:
        """Few images or small ones: what the `small` recipe is for."""
        return self.train_images < SMALL_COUNT or self.side < SMALL_SIDE


# The built-in set, surveyed (1,437 training images of 8x8 px): the `small` recipe's default.
DIGITS = DataSurvey("digits", 1437, 10, 8, channels=1)


def survey(dataset: str) -> DataSurvey:
    """`dataset` (as `DataConfig.dataset`: "digits", an ImageFolder or shards) surveyed: its
    index (cached for folders, so the run itself reuses it) and `SAMPLED_IMAGES` decoded images.
    Raises what `load_sources` raises for data it cannot read."""
    from deit.data.pipeline import load_sources  # the pipeline imports grain; only when asked

    train, _ = load_sources(DataConfig(dataset=dataset, workers=0))
    n = len(train)
    picks = np.unique(np.linspace(0, n - 1, min(SAMPLED_IMAGES, n)).round().astype(int))
    sides, grey = [], []
    for i in picks:
        with contextlib.suppress(ValueError):  # an unreadable image: the run reports it later
            image = train.load(int(i))
            sides.append(min(image.shape[:2]))
            grey.append(image.ndim == 2 or image.shape[-1] == 1 or _is_grey(image))
    if not sides:
        raise InputError(
            f"none of {len(picks)} training images of {dataset} could be decoded; expected "
            "readable images (deit data check lists the bad ones)"
        )
    counts = np.bincount(np.asarray(train.labels), minlength=len(train.classes))
    balance = float(counts.min() / counts.max()) if counts.max() > 0 else 1.0
    channels = 1 if all(grey) else 3
    return DataSurvey(dataset, n, len(train.classes), int(np.median(sides)), channels, balance)


def _is_grey(image: np.ndarray) -> bool:
    """An RGB image whose channels are equal (a grey image saved as colour)."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
