"""The iterator over a run's batches (`Batches`): grain over a `Plan`, its worker processes
started when it is made and stopped on every way out (killed at once when the run is stopping).

What each batch holds is the batch function's (`pipeline._MakeBatch`); this module only runs it,
in the main process (0 workers) or in grain's workers, with a few reading threads either way.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from typing import Any, Protocol

import grain
import numpy as np

from deit.data.plan import Plan
from deit.signals import ignore_in_worker

# Reading threads per process (the main one with 0 workers, else each worker): PIL releases the
# GIL while it decodes and resizes, so a second thread keeps a core busy during the Python parts.
READ_THREADS = 2


class BatchFn(Protocol):
    """Element `k` of `plan` -> one local batch; pickles small (it travels to the workers)."""

    plan: Plan

    def __call__(self, k: int) -> dict[str, np.ndarray]: ...


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
        fn: BatchFn,
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
