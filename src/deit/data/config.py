"""The data settings (`DataConfig`) and where data files live on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deit.data.randaugment import RandAugment
from deit.errors import InputError
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

# torchvision's IMG_EXTENSIONS, and .gif.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BAD_IMAGES = ("error", "skip")
DECODE = ("host", "gpu")
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
    """"digits" (built in), an image folder with train/<class>/ and val/<class>/, shards, or
    "synthetic[:N]" (random images at img_size, no per-image work: measures the loop and step)."""
    img_size: int = 224
    """Side of the square training and evaluation images."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range, as fractions of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random-resized-crop aspect-ratio range."""
    hflip: float = 0.5
    """Chance of a horizontal flip."""
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment string (official `--aa`); None: no RandAugment."""
    three_augment: bool = False
    """DeiT III's 3-Augment (official `--ThreeAugment`, `data.three_augment`): the crop and flip,
    then one of grayscale / solarize / Gaussian blur, then colour jitter. It replaces RandAugment
    and random erasing: `randaugment` and `erasing` are not applied while it is on."""
    src: bool = False
    """3-Augment's "simple random crop" (official `--src`): resize the shorter side to img_size,
    random crop with reflect padding 4, flip; instead of the random-resized crop."""
    color_jitter: float = 0.3
    """3-Augment's brightness / contrast / saturation jitter (official `--color-jitter`); 0: off."""
    decode_scaling: bool = True
    """Decode a JPEG at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling) when its random-resized
    crop is at least that many times the training size: the same crops, faster on large photos;
    False: always decode whole (then every image is bit-identical to decode-then-crop)."""
    decode: Literal["host", "gpu"] = "host"
    """Where training images are decoded and augmented: "host" (grain's workers: decode, crop,
    flip, RandAugment on the CPU) or "gpu" (workers only read the files and draw the same
    augmentation; nvImageCodec decodes on the GPU, else the host with a warning, and the crop,
    flip and RandAugment run on the device: docs/gpu_input.md)."""
    crop_pct: float = 0.875
    """Evaluation: resize to img_size / crop_pct, then centre-crop img_size."""
    interpolation: Literal["bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"] = (
        "bicubic"
    )
    """Resampling of crops and resizes."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean of the normalisation (images in [0, 1])."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std of the normalisation."""
    repeats: int = 3
    """Repeated augmentation: each image appears this many times per epoch, differently
    augmented, on different devices (1: off)."""
    workers: int | None = None
    """grain worker processes for the whole run; None: one per usable core; 0: in-process."""
    bad_images: Literal["error", "skip"] = "error"
    """An unreadable image stops the run naming it, or is replaced by the next readable one."""
    label_fraction: float = 1.0
    """Fraction of the training images the run (teacher and student) learns from: per class
    max(1, round(fraction x count)), chosen by subset_seed; validation is always whole."""
    subset_seed: int = 0
    """Seed of the label_fraction choice (the same seed gives the same images)."""
    subset_repeats: int = 1
    """Each labelled image appears this many times per epoch, differently augmented (with
    label_fraction f, about 1/f keeps an epoch as long as the whole split's: the same steps and
    evaluations per epoch at every fraction)."""

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise InputError(f"img_size {self.img_size}; expected a positive size")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise InputError(f"scale {self.scale}; expected 0 < min <= max <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise InputError(f"ratio {self.ratio}; expected 0 < min <= max")
        if not 0 <= self.hflip <= 1:
            raise InputError(f"hflip {self.hflip} is outside [0, 1]")
        if not self.crop_pct > 0:
            raise InputError(f"crop_pct {self.crop_pct}; expected a fraction > 0")
        if any(not s > 0 for s in self.std):
            raise InputError(f"std {self.std}; expected positive values")
        if self.repeats < 1:
            raise InputError(f"repeats {self.repeats}; expected 1 or more")
        if self.workers is not None:
            most = MAX_WORKERS_PER_CORE * usable_cores()
            if not 0 <= self.workers <= most:
                raise InputError(
                    f"workers {self.workers}; expected 0 (decode in this process) to {most} "
                    f"({MAX_WORKERS_PER_CORE} per usable core), or leave it unset for one per core"
                )
        if self.decode not in DECODE:
            raise InputError(f"decode {self.decode!r}; expected 'host' or 'gpu'")
        if self.bad_images not in BAD_IMAGES:
            raise InputError(f"bad_images {self.bad_images!r}; expected 'error' or 'skip'")
        if not 0.0 < self.label_fraction <= 1.0:
            raise InputError(f"label_fraction {self.label_fraction}; expected a fraction in (0, 1]")
        if self.subset_repeats < 1:
            raise InputError(f"subset_repeats {self.subset_repeats}; expected 1 or more")
        if self.randaugment:
            RandAugment.from_string(self.randaugment)
        if not self.color_jitter >= 0:
            raise InputError(f"color_jitter {self.color_jitter}; expected a strength >= 0")
        if self.src and not self.three_augment:
            raise InputError("src (simple random crop) is 3-Augment's; expected three_augment")
        if self.three_augment and self.decode == "gpu":
            raise InputError("three_augment runs on the host; expected decode 'host', not 'gpu'")

    @property
    def num_workers(self) -> int:
        """The worker processes this config asks for (one per usable core when unset)."""
        return usable_cores() if self.workers is None else self.workers
