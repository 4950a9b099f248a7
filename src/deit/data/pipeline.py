"""The host input pipeline: sources -> per-image decode and augmentation (grain) -> this
process's share of each global batch, for a whole run.

A run is one grain pipeline over a `Plan`: for every epoch its training batches, then its
validation batches, element `k` of the plan being one whole local batch. Worker processes start
once, are handed batch numbers (the sources they read pickle as a few paths), and prefetch the
validation set while the epoch's last steps train. Every random choice derives from
`(seed, epoch, position)`: the epoch's order from `(seed, epoch)`, each image's augmentation from
`(seed, epoch, position in the epoch)`, so batches do not depend on the worker count, a run that
resumes at step `s` rebuilds exactly the batches an uninterrupted run would have seen, and each
process of a multi-host run computes its own disjoint share of the same global order.

An unreadable image is found where it is read (`_MakeBatch._read`): marked under
`bad_images="error"`, replaced by the next readable record under "skip"; what the loop then does
with it is `bad_images.py`'s.

Where the rest is: which records each batch holds, `plan.py`; the iterator and its workers,
`batches.py`. This module holds what a batch is made of and the functions that start a run's
batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deit.data import gpu, index, shards, subset
from deit.data.bad_images import agreed_bad, check_sources, take_bad
from deit.data.batches import Batches
from deit.data.config import DataConfig
from deit.data.host import eval_transform, train_transform, train_transform_encoded
from deit.data.plan import Plan, cached_order, epoch_order
from deit.data.randaugment import RandAugment
from deit.data.sources import (
    BadImageError,
    RecordSource,
    Source,
    digits,
    is_synthetic,
    synthetic,
)
from deit.data.three_augment import three_augment

# The old import paths of what moved to plan.py, batches.py and bad_images.py, for one release.
__all__ = [
    "Batches",
    "Plan",
    "agreed_bad",
    "check_images",
    "encoded",
    "epoch_order",
    "eval_batches",
    "gpu_path",
    "load_sources",
    "run_batches",
    "take_bad",
    "train_batches",
]

log = logging.getLogger("deit")

MAX_SUBSTITUTES = 64  # how far "skip" looks for a readable record before giving up


def load_sources(cfg: DataConfig) -> tuple[RecordSource, RecordSource]:
    """(train, val) for `cfg.dataset`: the built-in digits, a shard folder or an ImageFolder;
    the training split cut to `cfg.label_fraction` of its images (`subset.Subset`)."""
    if cfg.dataset == "digits":
        train, val = digits()
    elif is_synthetic(cfg.dataset):
        train, val = synthetic(cfg.dataset, cfg.img_size)
    elif shards.is_shard_folder(cfg.dataset):
        train, val = shards.open_shards(cfg.dataset)
    else:
        train, val = index.image_folder(cfg.dataset)
    if cfg.label_fraction < 1.0 or cfg.subset_repeats > 1:
        keep = subset.stratified_indices(train.labels, cfg.label_fraction, cfg.subset_seed)
        train = subset.Subset(train, keep, cfg.subset_repeats)
        log.info(subset.describe(train, cfg.label_fraction, cfg.subset_seed))
    return train, val


def encoded(source: Any, i: int) -> bytes | str | None:
    """Record `i`'s encoded file (bytes, or its path) where the source keeps one, else None (the
    source holds decoded arrays)."""
    if isinstance(source, subset.Subset):
        return encoded(source.source, int(source.indices[i]))
    if isinstance(source, index.FolderSource):
        return source.name(i)
    if isinstance(source, shards.ShardSource):
        return source.record(i)[2]
    if isinstance(source, Source):
        image = source.images[i]
        return None if isinstance(image, np.ndarray) else image
    return None


@dataclass(frozen=True)
class _MakeBatch:
    """Element `k` of a `Plan` -> one local batch (runs in grain's workers; pickles small)."""

    plan: Plan
    train: Any
    val: Any
    cfg: DataConfig
    gpu: bool = False
    """Training batches for the GPU path: bytes and draws (`data.gpu`), not images."""

    @functools.cached_property
    def randaugment(self) -> RandAugment | None:
        if self.cfg.three_augment or not self.cfg.randaugment:  # 3-Augment replaces it
            return None
        return RandAugment.from_string(self.cfg.randaugment)

    def _read(
        self, source: Any, i: int, load: Callable[[Any, int], np.ndarray] | None = None
    ) -> tuple[np.ndarray | None, int, int]:
        """(image or None, label, bad index or -1): `load(source, i)` (default `source.load`), a
        substitute standing in under "skip"."""
        load = load or (lambda src, j: src.load(j))
        try:
            return load(source, i), int(source.labels[i]), -1
        except ValueError:
            if self.cfg.bad_images == "error":
                return None, int(source.labels[i]), i
        n = len(source)
        for k in range(1, min(MAX_SUBSTITUTES, n)):
            j = (i + k) % n
            try:
                return load(source, j), int(source.labels[j]), i
            except ValueError:
                continue
        raise BadImageError(
            f"{min(MAX_SUBSTITUTES, n)} consecutive records from {source.name(i)} cannot be "
            "decoded; expected mostly readable images (run deit data check on the folder)"
        )

    def _augment(self, source: Any, i: int, seed: list[int]) -> np.ndarray:
        """Record `i` decoded and augmented with the draws of `seed` (= (seed, epoch, position),
        anew for each record tried, so a substitute gets the draws the bad record would have).

        From the encoded file where the source keeps one (`train_transform_encoded`): the crop
        box is drawn from its header's size, a JPEG decodes at reduced size where the crop allows
        (`cfg.decode_scaling`), and elsewhere the pixels are those of decode-then-augment."""
        kw = {
            "scale": self.cfg.scale,
            "ratio": self.cfg.ratio,
            "hflip": self.cfg.hflip,
            "randaugment": self.randaugment,
            "interpolation": self.cfg.interpolation,
        }
        size = self.cfg.img_size
        data = encoded(source, i)
        if self.cfg.three_augment:
            del kw["randaugment"]
            return three_augment(
                source.load(i) if data is None else data,
                np.random.default_rng(seed),
                size,
                src=self.cfg.src,
                color_jitter=self.cfg.color_jitter,
                dct=self.cfg.decode_scaling,
                **kw,
            )
        if data is not None:
            rng = np.random.default_rng(seed)
            return train_transform_encoded(data, rng, size, dct=self.cfg.decode_scaling, **kw)
        return train_transform(source.load(i), np.random.default_rng(seed), size, **kw)

    def _draw(self, source: Any, i: int, seed: list[int]) -> tuple:
        """The GPU path's worker part (`data.gpu`): record `i`'s bytes, header size and draws."""
        raw = gpu.read_bytes(encoded(source, i))
        size = gpu.header(raw, source.name(i))
        rng = np.random.default_rng(seed)
        return raw, size, gpu.draw_train(size[0], size[1], rng, self.cfg, self.randaugment)

    def _gpu_train(self, epoch: int, j: int) -> dict[str, np.ndarray]:
        p = self.plan
        lo = p.process_index * p.local
        order = cached_order(p.train_size, epoch, p.seed, p.global_batch, p.repeats)
        raws, sizes, draws, seeds, records, labels, bad = [], [], [], [], [], [], []
        for slot in range(lo, lo + p.local):
            seed = [p.seed, epoch, j * p.global_batch + slot]
            i = int(order[j, slot])
            got, label, b = self._read(self.train, i, functools.partial(self._draw, seed=seed))
            if got is None:  # unreadable under "error": an empty slot, marked
                got = (
                    b"",
                    (0, 0, False),
                    gpu.draw_train(1, 1, np.random.default_rng(0), self.cfg, None),
                )
            raws.append(got[0])
            sizes.append(got[1])
            draws.append(got[2])
            seeds.append(seed)
            records.append(i)
            labels.append(label)
            bad.append(b)
        batch = gpu.pack(raws, draws, sizes, seeds, records)
        batch["label"] = np.asarray(labels, np.int32)
        batch["mask"] = np.ones(len(labels), np.float32)
        batch["bad"] = np.asarray(bad, np.int32)
        return batch

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        kind, epoch, j = self.plan.element(int(k))
        if kind == "train" and self.gpu:
            return self._gpu_train(epoch, j)
        p, size = self.plan, self.cfg.img_size
        lo = p.process_index * p.local
        blank = np.zeros((size, size, 3), np.uint8)
        images, labels, bad, mask = [], [], [], []
        if kind == "train":
            order = cached_order(p.train_size, epoch, p.seed, p.global_batch, p.repeats)
            for slot in range(lo, lo + p.local):
                load = None
                if not getattr(self.train, "prepared", False):
                    load = functools.partial(
                        self._augment, seed=[p.seed, epoch, j * p.global_batch + slot]
                    )
                image, label, b = self._read(self.train, int(order[j, slot]), load)
                images.append(blank if image is None else image)
                labels.append(label)
                bad.append(b)
                mask.append(1.0)
        else:
            for slot in range(lo, lo + p.local):
                position = j * p.global_batch + slot
                i = min(position, p.val_size - 1)
                image, label, b = self._read(self.val, i)
                if image is not None and not getattr(self.val, "prepared", False):
                    image = eval_transform(
                        image,
                        size,
                        crop_pct=self.cfg.crop_pct,
                        interpolation=self.cfg.interpolation,
                    )
                images.append(blank if image is None else image)
                labels.append(label)
                bad.append(b if position < p.val_size else -1)
                mask.append(float(position < p.val_size and b < 0))
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, np.int32),
            "mask": np.asarray(mask, np.float32),
            "bad": np.asarray(bad, np.int32),
        }


def run_batches(
    train: Any,
    val: Any,
    cfg: DataConfig,
    *,
    seed: int,
    global_batch: int,
    epochs: int,
    start_step: int = 0,
    evaluate: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    labelled: bool = True,
) -> Batches:
    """`(kind, epoch, batch)` for a whole run from global step `start_step` on: each epoch's
    training batches ("train"), then, with `evaluate`, the validation set ("eval").

    Batches are this process's share: `{"image": uint8 (L, S, S, 3), "label": int32 (L,),
    "mask": float32 (L,) (0 on padding and skipped images), "bad": int32 (L,) (the index of an
    unreadable record, else -1; see `take_bad`)}` with `L = global_batch / process_count`.
    """
    epoch_order(len(train), 0, seed, global_batch, cfg.repeats)  # fail early on a tiny set
    plan = Plan(
        len(train),
        len(val) if evaluate else 0,
        global_batch,
        epochs,
        seed,
        cfg.repeats,
        process_index,
        process_count,
    )
    on_gpu = gpu_path(train, cfg)
    fn = _MakeBatch(plan, train, val, cfg, on_gpu)
    # Prepared records (synthetic) need no per-image work: worker processes would only copy them.
    workers = 0 if getattr(train, "prepared", False) else cfg.num_workers
    stage = gpu.DeviceStage(cfg, train, functools.partial(encoded, train)) if on_gpu else None
    return Batches(fn, plan.position(start_step), workers, labelled, stage)


def gpu_path(train: Any, cfg: DataConfig) -> bool:
    """Whether training batches take the GPU path: `cfg.decode == "gpu"` and a source of encoded
    files (decoded arrays, the digits and synthetic images take the host path, with a warning)."""
    if cfg.decode != "gpu":
        return False
    gpu.check_config(cfg)
    if getattr(train, "prepared", False) or len(train) == 0 or encoded(train, 0) is None:
        log.warning(
            "data.decode gpu needs encoded image files (a folder or shards); this data set holds "
            "decoded images, which take the host path"
        )
        return False
    return True


def train_batches(
    source: Any,
    cfg: DataConfig,
    *,
    seed: int,
    global_batch: int,
    epochs: int = 1,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Batches:
    """This process's share of the training batches of `epochs` epochs from `start_step` on
    (`run_batches` without evaluation)."""
    return run_batches(
        source,
        source,
        cfg,
        seed=seed,
        global_batch=global_batch,
        epochs=epochs,
        start_step=start_step,
        evaluate=False,
        process_index=process_index,
        process_count=process_count,
        labelled=False,
    )


def eval_batches(
    source: Any,
    cfg: DataConfig,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Batches:
    """The whole set once, in order, padded to whole batches; `mask` is 0 on the padding."""
    plan = Plan(0, len(source), global_batch, 1, 0, 1, process_index, process_count)
    return Batches(_MakeBatch(plan, source, source, cfg), 0, cfg.num_workers, labelled=False)


def check_images(
    path: str | Path, workers: int | None = None, progress: bool = True
) -> list[tuple[str, str]]:
    """`deit data check`: decode every image of both splits in `workers` processes (one per
    usable core by default), with a progress bar. Returns `(file, reason)` of each failure."""
    cfg = DataConfig(dataset=str(path), workers=workers)
    return check_sources(load_sources(cfg), max(cfg.num_workers, 1), progress)
