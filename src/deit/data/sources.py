"""Random-access record sources: what every source offers, the in-memory one, the built-in set
and the synthetic one.

A source has `classes`, `labels` (int32 `(N,)`), `len()`, `load(i)` (uint8 `(H, W, 3)`, or
`ValueError` naming the record when it cannot be decoded) and `name(i)` (the file a record came
from). Sources travel to grain's worker processes by pickling, so the on-disk ones
(`index.FolderSource`, `shards.ShardSource`) pickle as a few paths and open their files lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from deit.data.host import decode_image
from deit.errors import InputError

# The built-in set: scikit-learn's digits, 1,797 8x8 grey images of 10 classes, split once,
# stratified, 80/20 with this seed: 1,437 train / 360 val images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class RecordSource(Protocol):
    classes: list[str]

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def load(self, index: int) -> np.ndarray: ...

    def name(self, index: int) -> str: ...


class BadImageError(InputError):
    """An image that cannot be decoded was read while `bad_images` is "error"."""


@dataclass
class Source:
    """An in-memory source: `images` are uint8 `(H, W, 3)` arrays or file paths."""

    images: Sequence[Any]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        image = self.images[index]
        if isinstance(image, np.ndarray):
            return image
        return decode_image(image)

    def name(self, index: int) -> str:
        image = self.images[index]
        return f"record {index}" if isinstance(image, np.ndarray) else str(image)


def digits() -> tuple[Source, Source]:
    """scikit-learn's digits as RGB uint8 8x8 images; the fixed stratified split above."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = data.target.astype(np.int32)
    tr, va = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_VAL_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    classes = [str(c) for c in data.target_names]
    return Source(images[tr], labels[tr], classes), Source(images[va], labels[va], classes)


def arrays(images: np.ndarray, labels: np.ndarray, classes: list[str] | None = None) -> Source:
    """Numpy images `(N, H, W, 3)` uint8 (grey `(N, H, W)` is repeated to RGB) and labels `(N,)`."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(
            f"images are {images.dtype}{tuple(images.shape)}; expected uint8 (N, H, W, 3)"
        )
    labels = np.asarray(labels, np.int32)
    if labels.shape != (len(images),):
        raise InputError(f"labels have shape {labels.shape}; expected ({len(images)},)")
    classes = classes or [str(i) for i in range(int(labels.max()) + 1)]
    return Source(list(images), labels, classes)


# `--data synthetic[:N]`: ImageNet-1k's shape (1,000 classes, its 1,281,167 training images
# unless N is given, a tenth of that for validation) from a pool of random images.
SYNTHETIC = "synthetic"
SYNTHETIC_CLASSES = 1000
SYNTHETIC_TRAIN = 1_281_167
SYNTHETIC_POOL = 64  # distinct images; record i is pool[i % SYNTHETIC_POOL]


def is_synthetic(dataset: str) -> bool:
    return dataset == SYNTHETIC or dataset.startswith(SYNTHETIC + ":")


@dataclass
class SyntheticSource:
    """Random uint8 `(size, size, 3)` images already at the training size, labels `i % classes`.

    `prepared`: the pipeline neither decodes nor augments them (`data.pipeline`), so a run on it
    measures the training loop and the device step without the host's per-image work (what
    timm's and DALI's synthetic inputs are for)."""

    count: int
    size: int
    num_classes: int = SYNTHETIC_CLASSES
    seed: int = 0
    prepared = True

    @property
    def classes(self) -> list[str]:
        return [f"class_{k:04d}" for k in range(self.num_classes)]

    @property
    def labels(self) -> np.ndarray:
        return (np.arange(self.count) % self.num_classes).astype(np.int32)

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> np.ndarray:
        return self._pool[index % len(self._pool)]

    def name(self, index: int) -> str:
        return f"synthetic record {index}"

    @property
    def _pool(self) -> np.ndarray:
        pool = self.__dict__.get("pool")
        if pool is None:
            rng = np.random.default_rng(self.seed)
            shape = (min(SYNTHETIC_POOL, self.count), self.size, self.size, 3)
            pool = self.__dict__["pool"] = rng.integers(0, 256, shape, np.uint8)
        return pool

    def __getstate__(self) -> dict[str, Any]:  # workers draw the pool again, from the seed
        return {k: v for k, v in self.__dict__.items() if k != "pool"}


def synthetic(dataset: str, size: int) -> tuple[SyntheticSource, SyntheticSource]:
    """(train, val) for `dataset` "synthetic" or "synthetic:N" (N training images)."""
    _, _, count = dataset.partition(":")
    try:
        n = int(count) if count else SYNTHETIC_TRAIN
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(
            f"data {dataset!r}; expected 'synthetic' or 'synthetic:N' with N a positive count"
        )
    val = max(1, n // 10)
    return SyntheticSource(n, size, seed=0), SyntheticSource(val, size, seed=1)
