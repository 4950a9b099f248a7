"""Data sources and the host input pipeline: records -> per-image transforms (grain) -> batches.

Every random choice derives from `(seed, epoch, position)`: the epoch's order from `(seed, epoch)`
and each image's augmentation from `(seed, epoch, position in the epoch)`. A run that resumes at
step `s` therefore rebuilds exactly the batches an uninterrupted run would have seen, and each
process of a multi-host run computes its own disjoint share of the same global order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from deit.transforms import RandAugment, decode_image, eval_transform, train_transform
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# The built-in set: scikit-learn's digits, 1,797 8x8 grey images of 10 classes, split once,
# stratified, 80/20 with this seed: 1,437 train / 360 val images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are augmented (paper §6, Table 9 by default)."""

    dataset: str = "digits"  # "digits" or an image folder with train/ and val/
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
    workers: int = 2
    bad_images: str = "error"  # or "skip"

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ValueError(f"img_size {self.img_size}; expected a positive size")
        if self.repeats < 1:
            raise ValueError(f"repeats {self.repeats}; expected 1 or more")
        if self.workers < 0:
            raise ValueError(f"workers {self.workers}; expected 0 (in-process) or more")
        if self.bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images {self.bad_images!r}; expected 'error' or 'skip'")
        if self.randaugment:
            RandAugment.from_string(self.randaugment)


@dataclass
class Source:
    """A random-access set of records: `images` are uint8 `(H, W, 3)` arrays or file paths."""

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
        raise ValueError(
            f"images are {images.dtype}{tuple(images.shape)}; expected uint8 (N, H, W, 3)"
        )
    labels = np.asarray(labels, np.int32)
    if labels.shape != (len(images),):
        raise ValueError(f"labels have shape {labels.shape}; expected ({len(images)},)")
    classes = classes or [str(i) for i in range(int(labels.max()) + 1)]
    return Source(list(images), labels, classes)


def _class_dirs(root: Path) -> list[str]:
    if not root.is_dir():
        raise ValueError(
            f"{root} is not a folder; expected PATH/train/<class>/ and PATH/val/<class>/"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return classes


def _check_decodable(paths: list[Path], labels: list[int], bad_images: str) -> tuple[list, list]:
    bad, first_reason = [], ""
    for path in paths:
        try:
            decode_image(path)
        except ValueError as err:
            bad.append(path)
            first_reason = first_reason or str(err).split(": ", 1)[-1]
    if bad and bad_images == "error":
        shown = ", ".join(str(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{len(bad)} image(s) cannot be decoded: {shown} (the first: {first_reason}); fix or "
            "remove them, or pass --bad-images skip"
        )
    if bad:
        print(f"skipped {len(bad)} image(s) that cannot be decoded")
        skipped = set(bad)
        keep = [i for i, p in enumerate(paths) if p not in skipped]
        return [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels


def image_folder(root: str | Path, bad_images: str = "error") -> tuple[Source, Source]:
    """ImageFolder layout `root/{train,val}/<class>/<image>`; class order is sorted folder names.

    Files without an image suffix are ignored. Every image is decoded once here, so a corrupt file
    is reported before training starts rather than mid-epoch.
    """
    root = Path(root)
    classes = _class_dirs(root / "train")
    val_classes = _class_dirs(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(
            f"train and val class folders differ: only in train {only_train}, only in val "
            f"{only_val}; expected the same classes in both"
        )
    sources = []
    for split in ("train", "val"):
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(
                p for p in (root / split / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise ValueError(
                    f"class folder {root / split / name} holds no images; expected files ending "
                    f"in {', '.join(IMAGE_SUFFIXES)}"
                )
            paths += files
            labels += [label] * len(files)
        paths, labels = _check_decodable(paths, labels, bad_images)
        sources.append(Source([str(p) for p in paths], np.asarray(labels, np.int32), classes))
    return sources[0], sources[1]


def load_sources(cfg: DataConfig) -> tuple[Source, Source]:
    if cfg.dataset == "digits":
        return digits()
    return image_folder(cfg.dataset, cfg.bad_images)


def epoch_order(n: int, epoch: int, seed: int, global_batch: int, repeats: int) -> np.ndarray:
    """Record indices of one epoch as `(steps, global_batch)`, the last partial batch dropped.

    Repeated augmentation (Hoffer et al. 2020; DeiT §6): a shuffled `1/repeats` of the records,
    each `repeats` times, so an epoch still has `n` samples. Within a batch the copies of one
    image sit `global_batch / repeats` apart: with 3 or more devices, each holding a contiguous
    shard, they land on different devices (as the official sampler deals them out). The layout
    does not depend on the device count, so 1 and 8 devices train on identical batches.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = np.repeat(rng.permutation(n), repeats)[:n]
    steps = n // global_batch
    if steps == 0:
        raise ValueError(
            f"the training set has {n} samples, fewer than the global batch {global_batch}; "
            "use a smaller --batch-size"
        )
    order = order[: steps * global_batch].reshape(steps, global_batch)
    if repeats > 1 and global_batch % repeats == 0:
        order = order.reshape(steps, global_batch // repeats, repeats).transpose(0, 2, 1)
    return order.reshape(steps, global_batch)


@dataclass(frozen=True)
class _TrainExample:
    """Picklable per-record transform (grain workers run it in other processes)."""

    source: Source
    cfg: DataConfig
    seed: int
    epoch: int

    def __call__(self, position: int, record: tuple[int, int]) -> dict[str, Any]:
        index, global_position = record
        rng = np.random.default_rng([self.seed, self.epoch, int(global_position)])
        ra = RandAugment.from_string(self.cfg.randaugment) if self.cfg.randaugment else None
        image = train_transform(
            self.source.load(int(index)),
            rng,
            self.cfg.img_size,
            scale=self.cfg.scale,
            ratio=self.cfg.ratio,
            hflip=self.cfg.hflip,
            randaugment=ra,
            interpolation=self.cfg.interpolation,
        )
        return {"image": image, "label": self.source.labels[int(index)]}


@dataclass(frozen=True)
class _EvalExample:
    source: Source
    cfg: DataConfig

    def __call__(self, record: tuple[int, int]) -> dict[str, Any]:
        index, valid = record
        image = eval_transform(
            self.source.load(int(index)),
            self.cfg.img_size,
            crop_pct=self.cfg.crop_pct,
            interpolation=self.cfg.interpolation,
        )
        label = self.source.labels[int(index)]
        return {"image": image, "label": label, "mask": np.float32(valid)}


def _iterate(ds: grain.MapDataset, batch: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
    it = ds.batch(batch, drop_remainder=True).to_iter_dataset()
    if workers > 0:
        from absl import flags

        # grain's workers read absl flags, which only absl.app would otherwise parse.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def train_batches(
    source: Source,
    cfg: DataConfig,
    *,
    seed: int,
    epoch: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of epoch `epoch`'s batches from step `start_step` on.

    Yields `{"image": uint8 (L, H, W, 3), "label": int32 (L,)}` with `L = global_batch /
    process_count`; the processes' shares are disjoint and together are the global batch.
    """
    order = epoch_order(len(source), epoch, seed, global_batch, cfg.repeats)
    local = global_batch // process_count
    positions = np.arange(order.size).reshape(order.shape)
    lo, hi = process_index * local, (process_index + 1) * local
    records = np.stack([order[:, lo:hi], positions[:, lo:hi]], axis=-1)[start_step:]
    fn = _TrainExample(source, cfg, seed, epoch)
    ds = grain.MapDataset.source(list(map(tuple, records.reshape(-1, 2)))).map_with_index(fn)
    return _iterate(ds, local, cfg.workers)


def eval_batches(
    source: Source,
    cfg: DataConfig,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole set once, in order, padded to whole batches; `mask` is 0 on the padding."""
    n = len(source)
    steps = -(-n // global_batch)
    index = np.arange(steps * global_batch)
    valid = (index < n).astype(np.int64)
    records = np.stack([np.minimum(index, n - 1), valid], axis=-1).reshape(steps, global_batch, 2)
    local = global_batch // process_count
    mine = records[:, process_index * local : (process_index + 1) * local].reshape(-1, 2)
    ds = grain.MapDataset.source(list(map(tuple, mine))).map(_EvalExample(source, cfg))
    return _iterate(ds, local, cfg.workers)
