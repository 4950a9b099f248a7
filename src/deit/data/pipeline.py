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

An unreadable image is found where it is read. With `bad_images="error"` the batch comes back
marked and `take_bad` raises `BadImageError` naming the file before anything trains on it; with
"skip" the next readable record of the split stands in for it (deterministically, so a resumed
run stays identical), it is masked out of evaluation, and `take_bad` returns it for the logs.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grain
import numpy as np

from deit.data import gpu, index, shards, subset
from deit.data.config import DataConfig
from deit.data.host import eval_transform, train_transform, train_transform_encoded
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
from deit.errors import InputError
from deit.signals import ignore_in_worker

log = logging.getLogger("deit")

# Reading threads per process (the main one with 0 workers, else each worker): PIL releases the
# GIL while it decodes and resizes, so a second thread keeps a core busy during the Python parts.
READ_THREADS = 2
MAX_SUBSTITUTES = 64  # how far "skip" looks for a readable record before giving up
CHECK_CHUNK = 256  # the smallest chunk of records `deit data check` hands a worker


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


def _spread(global_batch: int, repeats: int) -> np.ndarray:
    """Positions `p -> i` that move sample `i` of a batch (copies of one image adjacent) so the
    copies sit `ceil(B / repeats)` or one fewer apart."""
    cols = -(-global_batch // repeats)
    grid = np.full(cols * repeats, -1)
    grid[:global_batch] = np.arange(global_batch)
    order = grid.reshape(cols, repeats).T.ravel()
    return order[order >= 0]


def epoch_order(n: int, epoch: int, seed: int, global_batch: int, repeats: int) -> np.ndarray:
    """Record indices of one epoch as `(steps, global_batch)`, the last partial batch dropped.

    Repeated augmentation (Hoffer et al. 2020; DeiT §6): a shuffled `1/repeats` of the records,
    each `repeats` times, so an epoch still has `n` samples. Within a batch the copies of one
    image sit about `global_batch / repeats` apart, so whenever the batch is split into
    contiguous shards over `d >= repeats` devices (any `d` dividing the batch), every copy is on
    a different device, as the official sampler deals them out. With fewer devices than repeats
    (1 or 2 for the recipe's 3) a device necessarily holds two copies. The layout does not depend
    on the device count, so 1 and 8 devices train on identical batches.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = np.repeat(rng.permutation(n), repeats)[:n]
    steps = n // global_batch
    if steps == 0:
        raise InputError(
            f"the training set has {n} samples, fewer than the global batch {global_batch}; "
            f"expected a batch of at most {n}"
        )
    order = order[: steps * global_batch].reshape(steps, global_batch)
    if repeats > 1:
        order = order[:, _spread(global_batch, repeats)]
    return order


@functools.lru_cache(maxsize=2)
def _cached_order(n: int, epoch: int, seed: int, global_batch: int, repeats: int) -> np.ndarray:
    return epoch_order(n, epoch, seed, global_batch, repeats)


@dataclass(frozen=True)
class Plan:
    """The batches of a run in the order the loop takes them: per epoch `steps_per_epoch`
    training batches, then `eval_steps` validation batches (the whole set, padded)."""

    train_size: int
    val_size: int
    global_batch: int
    epochs: int = 1
    seed: int = 0
    repeats: int = 1
    process_index: int = 0
    process_count: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.global_batch

    @property
    def eval_steps(self) -> int:
        return -(-self.val_size // self.global_batch)

    @property
    def local(self) -> int:
        return self.global_batch // self.process_count

    def __len__(self) -> int:
        return self.epochs * (self.steps_per_epoch + self.eval_steps)

    def element(self, k: int) -> tuple[str, int, int]:
        """`("train", epoch, step in epoch)` or `("eval", epoch, batch)` of element `k`."""
        epoch, j = divmod(k, self.steps_per_epoch + self.eval_steps)
        if j < self.steps_per_epoch:
            return "train", epoch, j
        return "eval", epoch, j - self.steps_per_epoch

    def position(self, step: int) -> int:
        """The element of global training step `step` (the first of an epoch after its end)."""
        if self.steps_per_epoch == 0:
            return 0
        epoch, j = divmod(step, self.steps_per_epoch)
        return epoch * (self.steps_per_epoch + self.eval_steps) + j


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
        order = _cached_order(p.train_size, epoch, p.seed, p.global_batch, p.repeats)
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
            order = _cached_order(p.train_size, epoch, p.seed, p.global_batch, p.repeats)
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


def _quiet_resource_tracker() -> None:
    """Workers killed by `Batches.close(now=True)` leave the shared memory of the batches they
    were making; multiprocessing's resource tracker (a process started with this one's warning
    options) unlinks it at exit, and without this says so in a warning that would come after,
    and bury, the run's last message."""
    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


class Batches:
    """Iterator over elements `start, start + 1, ...` of a `Plan`, yielding `(kind, epoch,
    batch)` (or the bare batches unless `labelled`); worker processes start when it is made.
    `close()` stops them (also before the first batch, and when used as a context manager);
    `close(now=True)` kills them first instead of waiting for their current batches."""

    def __init__(
        self,
        fn: _MakeBatch,
        start: int,
        workers: int,
        labelled: bool = True,
        stage: Callable[[dict], dict] | None = None,
    ) -> None:
        self.plan = fn.plan
        self._stage = stage
        self._others = set(multiprocessing.active_children())  # processes not ours to kill
        self._k = start
        self._labelled = labelled
        ds = grain.MapDataset.range(start, len(fn.plan)).map(fn)
        read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * READ_THREADS)
        it = ds.to_iter_dataset(read)
        self._shared = workers > 0
        if self._shared:
            from absl import flags

            # grain's workers read absl flags, which only absl.app would otherwise parse.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            _quiet_resource_tracker()
            options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
            # Ctrl-C reaches the workers too; the loop, not a KeyboardInterrupt in a worker,
            # decides what stops (and closes them).
            it = it.mp_prefetch(options, worker_init_fn=ignore_in_worker)
        self._it = iter(it)
        if self._shared:
            self._it.start_prefetch()  # type: ignore[attr-defined]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            raise
        kind, epoch, _ = self.plan.element(self._k)
        self._k += 1
        if self._shared:
            # Copies out of the workers' shared memory, which is then released at once rather
            # than whenever the last view of it is collected.
            batch = {k: np.array(v) for k, v in batch.items()}
        if self._stage is not None:
            batch = self._stage(batch)  # the GPU path: decode and augment on the device
        return (kind, epoch, batch) if self._labelled else batch

    def close(self, now: bool = False) -> None:
        if now and self._shared:
            # grain joins its workers one by one, each after the batch it is making (seconds
            # each on large images); a run that is stopping does not wait for those batches.
            for proc in set(multiprocessing.active_children()) - self._others:
                if proc.name.startswith("grain-process-prefetch"):
                    proc.kill()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def take_bad(batch: dict[str, np.ndarray], source: Any, bad_images: str) -> list[int]:
    """Remove `batch["bad"]` and return the unreadable records it names; under "error" raise
    `BadImageError` naming the first one instead (before anything uses the batch)."""
    bad = [int(i) for i in batch.pop("bad") if i >= 0]
    if bad and bad_images == "error":
        try:
            source.load(bad[0])
            reason = f"cannot decode image {source.name(bad[0])}"  # it failed in the worker
        except ValueError as err:
            reason = str(err)
        raise BadImageError(
            f"{reason}; stopped where it was read (the checkpoints written so far are kept). "
            "Fix or remove it, or skip unreadable images (bad_images='skip'); deit data check "
            "lists every unreadable image"
        )
    return bad


def agreed_bad(
    batch: dict[str, np.ndarray],
    source: Any,
    bad_images: str,
    agree: Callable[[int], Sequence[int]] | None = None,
) -> tuple[list[int], int]:
    """`take_bad` for one process of several: `(this share's bad records, all shares' count)`.

    `agree(n)` returns every process's count given this one's `n` (a collective, e.g.
    `parallel.process_counts`; None: this is the only process). Under "error" the processes count
    together first and then all stop, rather than one stopping while the others wait in the next
    step: the one that read the image names it, the others name that process."""
    if agree is None:
        skipped = take_bad(batch, source, bad_images)
        return skipped, len(skipped)
    skipped = take_bad(batch, source, "skip")
    counts = np.asarray(agree(len(skipped)))
    if bad_images == "error" and counts.sum():
        if skipped:
            take_bad({"bad": np.asarray(skipped)}, source, "error")  # raises, naming it
        raise BadImageError(
            f"process {int(np.argmax(counts > 0))} read an unreadable image (its own message names "
            "it); stopped where it was read (the checkpoints written so far are kept)"
        )
    return skipped, int(counts.sum())


def _check_chunk(source: Any, lo: int, hi: int) -> list[tuple[str, str]]:
    bad = []
    for i in range(lo, hi):
        try:
            source.load(i)
        except ValueError as err:
            bad.append((source.name(i), str(err).split(": ", 1)[-1]))
    return bad


def check_images(
    path: str | Path, workers: int | None = None, progress: bool = True
) -> list[tuple[str, str]]:
    """`deit data check`: decode every image of both splits in `workers` processes (one per
    usable core by default), with a progress bar. Returns `(file, reason)` of each failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from deit.progress import RateColumn

    cfg = DataConfig(dataset=str(path), workers=workers)
    sources = load_sources(cfg)
    # Chunks of about 1/8 of a worker's share (a source pickled to a worker reopens its files):
    # few enough that opening costs nothing, enough to balance the workers.
    workers = max(cfg.num_workers, 1)
    chunk = max(CHECK_CHUNK, sum(map(len, sources)) // (8 * workers))
    jobs = [
        (source, lo, min(lo + chunk, len(source)))
        for source in sources
        for lo in range(0, len(source), chunk)
    ]
    bad: list[tuple[str, str]] = []
    columns = (BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with (
        Progress("decoding", *columns, console=console, disable=not progress) as bar,
        ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool,
    ):
        task = bar.add_task("check", total=sum(len(s) for s in sources))
        futures = [pool.submit(_check_chunk, *job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            bad += future.result()
            bar.advance(task, job[2] - job[1])
    return bad
