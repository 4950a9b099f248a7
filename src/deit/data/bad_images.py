"""Unreadable images, on the loop's side: what a batch marked bad does, how several processes
agree about it, the files skipped in a run, and `deit data check` (every image decoded up front).

An unreadable image is found where it is read, in the worker (`pipeline._MakeBatch._read`), or
on the GPU path where its JPEG body is decoded (`gpu.DeviceStage`). With `bad_images="error"`
the batch comes back marked and `take_bad` raises `BadImageError` naming the file before
anything trains on it; with "skip" the next readable record of the split stands in for it
(deterministically, so a resumed run stays identical), it is masked out of evaluation, and
`take_bad` returns it for the logs (`SkippedImages`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np

from deit.data.sources import BadImageError, RecordSource

log = logging.getLogger("deit")

CHECK_CHUNK = 256  # the smallest chunk of records `deit data check` hands a worker


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


class SkippedImages:
    """Unreadable images met in a run under `bad_images="skip"`: counted, named at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.files: set[str] = set()

    def add(self, source: RecordSource, indices: list[int], everywhere: int) -> None:
        """`indices` met by this process; `everywhere`: how many all processes met."""
        self.count += everywhere
        self.files.update(source.name(i) for i in indices)

    def report(self) -> list[str]:
        """The files this process skipped, sorted; a warning names the first ten."""
        files = sorted(self.files)  # this process's share (all of it with one process)
        if files:
            more = f" and {len(files) - 10} more" if len(files) > 10 else ""
            log.warning(
                f"skipped {len(files)} unreadable image(s) ({self.count} reads, each replaced by "
                f"the next readable record): {', '.join(files[:10])}{more}"
            )
        return files


def _check_chunk(source: RecordSource, lo: int, hi: int) -> list[tuple[str, str]]:
    bad = []
    for i in range(lo, hi):
        try:
            source.load(i)
        except ValueError as err:
            bad.append((source.name(i), str(err).split(": ", 1)[-1]))
    return bad


def check_sources(
    sources: Sequence[RecordSource], workers: int, progress: bool = True
) -> list[tuple[str, str]]:
    """Decode every record of `sources` in `workers` processes, with a progress bar (`deit data
    check`, through `pipeline.check_images`). Returns `(file, reason)` of each failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from deit.progress import RateColumn

    # Chunks of about 1/8 of a worker's share (a source pickled to a worker reopens its files):
    # few enough that opening costs nothing, enough to balance the workers.
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
