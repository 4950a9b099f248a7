"""The data settings (`DataConfig`) and where data files live on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deit.transforms import RandAugment
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

# torchvision's IMG_EXTENSIONS, and .gif.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BAD_IMAGES = ("error", "skip")
# More worker processes than this many per usable core only add start-up time and memory.
MAX_WORKERS_PER_CORE = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_home() -> Path:
    """`$DEIT_HOME`, else `~/.cache/deit`: folder indexes (and downloaded weights) live here."""
    return Path(os.environ.get("DEIT_HOME") or Path.home() / ".cache" / "deit")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are augmented (paper §6, Table 9 by default).

    `dataset` is "digits", an ImageFolder (`train/<class>/`, `val/<class>/`) or a folder of
    ArrayRecord shards written by `deit data pack`. `workers` are grain worker processes for
    the whole run (None: one per usable core; 0: decode in this process). `bad_images` says what
    an unreadable image does when it is read: "error" stops the run naming the file, "skip"
    trains on a deterministic substitute and reports the file.
    """

    dataset: str = "digits"
    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    repeats: int = 3
    workers: int | None = None
    bad_images: str = "error"

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ValueError(f"img_size {self.img_size}; expected a positive size")
        if self.repeats < 1:
            raise ValueError(f"repeats {self.repeats}; expected 1 or more")
        if self.workers is not None:
            most = MAX_WORKERS_PER_CORE * usable_cores()
            if not 0 <= self.workers <= most:
                raise ValueError(
                    f"workers {self.workers}; expected 0 (decode in this process) to {most} "
                    f"({MAX_WORKERS_PER_CORE} per usable core), or leave it unset for one per core"
                )
        if self.bad_images not in BAD_IMAGES:
            raise ValueError(f"bad_images {self.bad_images!r}; expected 'error' or 'skip'")
        if self.randaugment:
            RandAugment.from_string(self.randaugment)

    @property
    def num_workers(self) -> int:
        """The worker processes this config asks for (one per usable core when unset)."""
        return usable_cores() if self.workers is None else self.workers
