"""Stopping on SIGINT (Ctrl-C) and SIGTERM (preemption): the first signal is a request that every
phase of a run honours within seconds, saving what is complete, never a `KeyboardInterrupt` in the
middle of a step or of a checkpoint write.

A `StopSignals` listens while it is open; nested ones (the teacher's loop inside a whole run, an
evaluation pass) share the outermost one's request, so a signal between two phases is not lost.
Loops check `requested` between steps; waits that can last (the next batch from the data
workers, an evaluation pass) go through `StopSignals.batches`, which a signal cuts short with
`Stop`. Whoever can say what was saved turns `Stop` into `Interrupted`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop(BaseException):
    """A signal cut a wait short. A BaseException, like KeyboardInterrupt, so that code that
    catches `Exception` while it waits (grain's iterators) lets it through."""


class Interrupted(Exception):
    """A signal stopped `phase` (e.g. "student training"); `checkpoints` holds what was saved.

    `run_output` is the folder that `deit train --resume --output` continues: the fit's own
    folder until the whole run (`run.train_and_evaluate`) replaces it with its top-level one.
    `resume` is the command that continues the run, or None when nothing is saved to resume.
    """

    def __init__(
        self,
        signum: int,
        phase: str,
        *,
        step: int | None = None,
        checkpoints: Path | None = None,
        output: Path | None = None,
    ) -> None:
        self.signum, self.phase, self.step, self.checkpoints = signum, phase, step, checkpoints
        self.run_output = output
        self.resume: str | None = f"deit train --resume --output {output}" if output else None
        super().__init__()

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        text = f"stopped by {name}"
        text += f" after step {self.step} ({self.phase})" if self.step else f" ({self.phase})"
        if self.checkpoints is not None:
            text += f"; a checkpoint is saved in {self.checkpoints}"
        if self.resume:
            text += f"; continue with: {self.resume}"
        elif self.run_output is not None:
            text += f"; nothing in {self.run_output} is saved yet: start the run again"
        return text


class StopSignals:
    """SIGTERM and SIGINT as a stop request while open (until `restore`); see the module."""

    _open: ClassVar[list[StopSignals]] = []

    def __init__(self) -> None:
        self._requested: int | None = None
        self._waiting = False
        self._previous: dict[int, Any] = {}
        self._outer = StopSignals._open[0] if StopSignals._open else None
        # Handlers can only be set from the main thread; elsewhere nothing listens.
        if self._outer is None and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        StopSignals._open.append(self)

    @property
    def _root(self) -> StopSignals:
        return self._outer or self

    @property
    def requested(self) -> int | None:
        """The first signal received (its number), or None."""
        return self._root._requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self._requested is None:  # a second Ctrl-C does not replace what the first asked
            self._requested = signum
        if self._waiting:
            self._waiting = False
            raise Stop

    def batches(self, iterator: Iterable[T]) -> Iterator[T]:
        """`iterator`'s items; `Stop` once a signal has come, also in the middle of a wait."""
        root, it = self._root, iter(iterator)
        while True:
            if root._requested is not None:
                raise Stop
            root._waiting = True
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception:
                # A data worker that the same signal ended (Ctrl-C reaches the whole process
                # group) fails the wait: that is the stop, not an error.
                if root._requested is not None:
                    raise Stop from None
                raise
            finally:
                root._waiting = False
            yield item

    def restore(self) -> None:
        """Stop listening: the previous handlers are back once the outermost one closes."""
        if self in StopSignals._open:
            StopSignals._open.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def ignore_in_worker(*_: int) -> None:
    """For data worker processes (grain's `worker_init_fn`, called with the worker's index and
    count): Ctrl-C reaches the whole process group, and the parent alone decides what stops (it
    closes them). SIGTERM keeps its default, so that a parent's `terminate()` still works."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
