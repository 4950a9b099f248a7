"""A run's wall-clock budget (`deit train --time-budget 15m`): its split between the teacher and
the student, the epochs of each phase that fit in its share once its first epoch has been timed
(`epochs_within`), and the teacher's early stop on a plateau of its validation accuracy
(`Plateau`).

The budget is the whole command's: `deit train` counts it from the process's launch
(`process_age`); each phase's share is counted from there (`PhaseBudget.less`), and the student
gets what is left when it starts, less `TAIL_SECONDS` for what follows its last epoch.

A phase is sized once, after its first epoch: that epoch pays for compiling the step and the
evaluation and for starting the data workers, so the time of an epoch is read from its steps
after the first one and its evaluation batches after the first one (`epoch_seconds`). The phase
then runs `1 + floor(time left / epoch)` epochs in all, so it ends within its share unless the
epochs slow down; a schedule (warm-up + cosine) is then laid over exactly those epochs.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from deit.errors import InputError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# The teacher's share of a budget: the ResNet trains alone, then the student trains with the
# teacher's forward pass in every step. A third, or the time of TEACHER_MIN_EPOCHS epochs where
# they cost more, up to TEACHER_MAX_SHARE (bench/small_suite.py: at 40 px in colour an epoch of
# the ResNet-8 costs twice the student's, and a third of 10 minutes left it at 75% after 17
# epochs, still rising); it stops earlier on a plateau.
TEACHER_SHARE = 1 / 3
TEACHER_MAX_SHARE = 1 / 2
TEACHER_MIN_EPOCHS = 30
# Kept after the student's last epoch: the final export, results.json and the curves' picture.
TAIL_SECONDS = 5.0


def parse_duration(text: str) -> float:
    """`"15m"`, `"90s"`, `"1h"`, `"1h30m"`, `"600"` (seconds) -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", t)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh])", "", t).strip():
            raise InputError(
                f"time_budget {text!r}; expected a duration such as 15m, 900s, 1h or 1h30m"
            )
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise InputError(f"time_budget {text!r}; expected a positive duration")
    return seconds


@dataclass(frozen=True)
class PhaseBudget:
    """One phase's share of the budget, counted from the phase's start (its compile and first
    batch included), and the bounds on its epochs."""

    seconds: float
    min_epochs: int = 1
    max_epochs: int = 1000
    plateau: bool = False
    """Also stop once the validation top-1 levels off (`Plateau`, patience `patience_for`)."""
    max_seconds: float | None = None
    """`min_epochs` are run only as far as they end by this (None: always)."""
    strict: bool = False
    """The run's last phase: it must end by `seconds`, so after every epoch its projected end
    is checked again against the measured epochs (`trimmed_epochs`)."""

    def less(self, spent: float) -> PhaseBudget:
        """This share when `spent` seconds of it went before the phase started."""
        cut = lambda s: None if s is None else max(0.0, s - spent)
        return replace(self, seconds=cut(self.seconds), max_seconds=cut(self.max_seconds))


def teacher_budget(total: float, max_epochs: int) -> PhaseBudget:
    """The teacher's share of `total` seconds: a third (`TEACHER_SHARE`), or as long as
    `TEACHER_MIN_EPOCHS` epochs take up to a half (`TEACHER_MAX_SHARE`); it stops earlier once
    its validation top-1 levels off."""
    return PhaseBudget(
        total * TEACHER_SHARE,
        min_epochs=min(TEACHER_MIN_EPOCHS, max_epochs),
        max_epochs=max_epochs,
        plateau=True,
        max_seconds=total * TEACHER_MAX_SHARE,
    )


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), 0 where that cannot be read: the
    start-up before `deit train` reaches its code (Python, JAX's import) counts in its budget."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def split(total: float, teacher_share: float = TEACHER_SHARE) -> tuple[float, float]:
    """(teacher, student) seconds of `total`; the student gets what the teacher leaves unused."""
    teacher = total * teacher_share
    return teacher, total - teacher


def epoch_seconds(
    steps: int, step_time: float, eval_batches: int, eval_batch_time: float, save_time: float = 0
) -> float:
    """One epoch in seconds from its parts, timed after the first epoch: `steps` training steps
    of `step_time`, `eval_batches` evaluation batches of `eval_batch_time`, one checkpoint."""
    return steps * step_time + eval_batches * eval_batch_time + save_time


def epochs_within(budget: PhaseBudget, elapsed: float, epoch_time: float) -> int:
    """Epochs in all (the first, already run, included) that end the phase by `budget.seconds`
    when `elapsed` seconds have gone and each further epoch takes `epoch_time`; within
    `[budget.min_epochs, budget.max_epochs]`."""
    fit = lambda seconds: (
        1 + (math.floor((seconds - elapsed) / epoch_time) if epoch_time > 0 else budget.max_epochs)
    )
    least = budget.min_epochs
    if budget.max_seconds is not None:
        least = min(least, max(1, fit(budget.max_seconds)))
    return int(min(budget.max_epochs, max(least, fit(budget.seconds))))


def trimmed_epochs(
    budget: PhaseBudget, elapsed: float, done: int, epochs: int, epoch_time: float
) -> int:
    """The epochs in all of a `budget.strict` phase after `done` of its `epochs`, `elapsed`
    seconds in, when an epoch has been taking `epoch_time`: `epochs` while the projected end
    passes `budget.seconds` by half an epoch at most, else as many as still end by it (at least
    one more). Never more than `epochs`: the cosine schedule is only ever shortened."""
    if epoch_time <= 0 or elapsed + (epochs - done) * epoch_time <= (
        budget.seconds + epoch_time / 2
    ):
        return epochs
    return min(epochs, done + max(1, math.floor((budget.seconds - elapsed) / epoch_time)))


def patience_for(epochs: int) -> int:
    """Evaluations without gain that count as a plateau in a run of `epochs`: a fifth of them,
    at least 4 (a noisy early epoch is not a plateau)."""
    return max(4, epochs // 5)


class Plateau:
    """`update(top1)` is True once the best validation top-1 (in %) has not risen by
    `min_gain` points for `patience` evaluations, or once it is 100%."""

    def __init__(self, patience: int, min_gain: float = 0.1) -> None:
        self.patience, self.min_gain = patience, min_gain
        self.best, self.best_at, self.seen = -math.inf, 0, 0

    def update(self, top1: float) -> bool:
        self.seen += 1
        if top1 >= self.best + self.min_gain:
            self.best, self.best_at = top1, self.seen
        return top1 >= 100.0 or self.seen - self.best_at >= self.patience

    def text(self, title: str, epoch: int, epochs: int) -> str:
        return (
            f"[{title}] stopping after epoch {epoch} of {epochs}: validation top-1 has not risen "
            f"by {self.min_gain:g} points over {self.seen - self.best_at} epoch(s) (best "
            f"{self.best:.1f}% at epoch {self.best_at})"
        )


class EpochClock:
    """Times of a phase's first epoch (`mark`, from the phase's `start`): the steady time of a
    later epoch is read from the steps and evaluation batches after the first of each, which
    carry the compiles (`epoch_time`)."""

    MARKS = ("first_step", "train_end", "first_eval", "eval_end", "saved")
    MEASURED = 2  # clean epochs before a trim is decided on them

    def __init__(self, start: float) -> None:
        self.start = start
        self.marks: dict[str, float] = {}
        self.ends: list[float] = []  # every epoch's end (its checkpoint saved)

    def epoch_end(self) -> None:
        self.ends.append(time.perf_counter())

    def recompiled(self) -> None:
        """The step was just compiled again: the next epoch carries that compile, so epochs are
        measured again from its end."""
        self.ends = []

    def measured_epoch(self) -> float | None:
        """The mean wall time of the epochs since the last one that carried a compile, saves
        and exports included; None before `MEASURED` of them have ended."""
        if len(self.ends) <= self.MEASURED:
            return None
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

    def mark(self, name: str) -> bool:
        """Records `name` now, the first time only; True if this call recorded it."""
        if name in self.marks:
            return False
        self.marks[name] = time.perf_counter()
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def epoch_time(self, steps: int, eval_batches: int) -> float:
        m = self.marks
        if steps > 1:
            step = (m["train_end"] - m["first_step"]) / (steps - 1)
        else:  # one step an epoch: its only step carried the compile
            step = m["train_end"] - self.start
        if eval_batches > 1:
            batch = (m["eval_end"] - m["first_eval"]) / (eval_batches - 1)
        else:
            batch = m["eval_end"] - m["train_end"]
        return epoch_seconds(steps, step, eval_batches, batch, m["saved"] - m["eval_end"])

    def sizing_text(
        self, title: str, budget: PhaseBudget, steps: int, eval_batches: int, epochs: int
    ) -> str:
        from deit.progress import duration

        per = self.epoch_time(steps, eval_batches)
        ends = time.strftime("%H:%M", time.localtime(time.time() + per * (epochs - 1)))
        return (
            f"[{title}] time budget {duration(budget.seconds)}: the first epoch took "
            f"{duration(self.elapsed())} (compiles included), each further one takes about "
            f"{duration(per)}: {epochs} epoch(s) in all (at most {budget.max_epochs}), "
            f"ending near {ends}"
        )
