"""What a data set looks like before a recipe is chosen for it: how many training images, how
many classes, how large the images typically are (`survey`). The `small` recipe is derived
from it (`configs.small`), and `deit train --data FOLDER` picks that recipe for a folder with
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
    of a few training images; `dataset` as given."""

    dataset: str
    train_images: int
    classes: int
    side: int

    @property
    def small(self) -> bool:
        """Few images or small ones: what the `small` recipe is for."""
        return self.train_images < SMALL_COUNT or self.side < SMALL_SIDE


# The built-in set, surveyed (1,437 training images of 8x8 px): the `small` recipe's default.
DIGITS = DataSurvey("digits", 1437, 10, 8)


def survey(dataset: str) -> DataSurvey:
    """`dataset` (as `DataConfig.dataset`: "digits", an ImageFolder or shards) surveyed: its
    index (cached for folders, so the run itself reuses it) and `SAMPLED_IMAGES` decoded images.
    Raises what `load_sources` raises for data it cannot read."""
    from deit.data.pipeline import load_sources  # the pipeline imports grain; only when asked

    train, _ = load_sources(DataConfig(dataset=dataset, workers=0))
    n = len(train)
    picks = np.unique(np.linspace(0, n - 1, min(SAMPLED_IMAGES, n)).round().astype(int))
    sides = []
    for i in picks:
        with contextlib.suppress(ValueError):  # an unreadable image: the run reports it later
            sides.append(min(train.load(int(i)).shape[:2]))
    if not sides:
        raise InputError(
            f"none of {len(picks)} training images of {dataset} could be decoded; expected "
            "readable images (deit data check lists the bad ones)"
        )
    return DataSurvey(dataset, n, len(train.classes), int(np.median(sides)))
