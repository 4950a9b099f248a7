"""What a run tells the user and leaves behind: the header (`header`), progress (rich bars in a
terminal, plain flushed lines elsewhere: CI logs, `nohup`, notebooks; or nothing), `metrics.jsonl`
(one JSON object per log line), and TensorBoard event files in `tb/`.
Only process 0 of a multi-host run writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from deit import diskspace

log = logging.getLogger("deit")

Mode = Literal["auto", "bars", "lines", "none"]


def resolve_mode(mode: Mode) -> Literal["bars", "lines", "none"]:
    """ "auto": bars when stderr (where progress goes) is a terminal, else lines."""
    if mode != "auto":
        return mode
    console = Console(stderr=True)
    return "bars" if console.is_terminal and not console.is_jupyter else "lines"


def say(text: str, mode: Mode = "auto") -> None:
    """One line of what a run does (unless `mode` is "none"), flushed at once."""
    if mode != "none":
        print(text, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """`1h 02m`, `3m 05s`, `12s`."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def header(rows: list[tuple[str, str]], mode: Mode = "auto") -> None:
    """The run's plan before any work, one `name  value` line per row."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        say(f"  {name:<{width}}  {value}", mode)


class RunLogger:
    """One phase's progress (`title`: "teacher" or "student"), its metrics.jsonl and TensorBoard
    events. `mode` "bars", "lines" or "none" ("auto": `resolve_mode`)."""

    def __init__(
        self,
        out: Path,
        *,
        title: str,
        total_steps: int,
        epochs: int = 1,
        mode: Mode = "auto",
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.title, self.total, self.epochs = title, total_steps, epochs
        self.mode = resolve_mode(mode)
        self._timed: tuple[float, int] | None = None  # (time, step) after the first step
        self._stepped: tuple[float, int] | None = None  # (time, step) of the latest step
        self._estimated = False
        self._epoch_told = False
        self.sized_later = False  # a time budget sizes the phase after its first epoch and says so
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(out / "tb"))
        self.progress = Progress(
            TextColumn(f"[bold]{title}[/] ep {{task.fields[epoch]}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            disable=self.mode != "bars",
        )
        self.task = self.progress.add_task(title, total=total_steps, epoch=0, info="")
        self.progress.start()

    def _say(self, text: str) -> None:
        if self.mode == "bars":
            self.progress.console.print(text, highlight=False)
        else:
            say(text, self.mode)

    def note(self, text: str) -> None:
        """One line of what the phase decided (its sizing, an early stop)."""
        if self.enabled:
            self._say(text)

    def resize(self, total_steps: int, epochs: int) -> None:
        """The phase's length changed (a time budget sized it after its first epoch)."""
        if self.enabled:
            self.total, self.epochs = total_steps, epochs
            self.progress.update(self.task, total=total_steps)

    def advance(self, step: int) -> None:
        if self.enabled:
            self._stepped = (time.perf_counter(), step)
            self.progress.update(self.task, completed=step)

    def _epoch_estimate(self, epoch: int) -> None:
        """Once per phase, after the first evaluation that follows timed steps: what an epoch
        costs (steps and evaluation) and when the phase will end."""
        if self._epoch_told or self.sized_later or self._timed is None or self._stepped is None:
            return
        (t0, s0), (t1, s1) = self._timed, self._stepped
        if s1 <= s0:
            return
        self._epoch_told = True
        per_step, evaluating = (t1 - t0) / (s1 - s0), time.perf_counter() - t1
        epochs_left = self.epochs - (epoch + 1)
        left = per_step * (self.total - s1) + evaluating * epochs_left
        ends = time.strftime("%H:%M", time.localtime(time.time() + left))
        per_epoch = per_step * (self.total // max(self.epochs, 1)) + evaluating
        self._say(
            f"[{self.title}] an epoch takes about {duration(per_epoch)} ({duration(evaluating)} "
            f"of it evaluating): about {duration(left)} for the {epochs_left} epoch(s) left, "
            f"ending near {ends}"
        )

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        try:
            self.jsonl.write(line)
            self.jsonl.flush()
        except OSError as err:
            if diskspace.is_no_space(err):
                raise diskspace.no_space(self.jsonl.name, len(line)) from None
            raise

    def log_start(self, values: dict[str, float]) -> None:
        if self.enabled:
            self._write({"kind": "start", **values})

    def first_step(self, step: int) -> None:
        """The first step is compiled and done: time from here on is what the rest will take."""
        if self.enabled and self._timed is None:
            self._timed = (time.perf_counter(), step)

    def _estimate(self, step: int) -> str | None:
        """`eta` once steps after the first have been timed (None before)."""
        if self._timed is None:
            self.first_step(step)
            return None
        then, first = self._timed
        if step <= first:
            return None
        per_step = (time.perf_counter() - then) / (step - first)
        left = per_step * (self.total - step)
        if not self._estimated:
            self._estimated = True
            self._say(
                f"[{self.title}] {per_step:.3g} s/step over {step - first} step(s) after the "
                f"first: about {duration(left)} for the {self.total - step} left (evaluations "
                "not included)"
            )
        return duration(left)

    def log_train(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, "epoch": epoch, **values})
        for key, value in values.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        info = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  {values['img_per_s']:.0f} img/s"
        eta = self._estimate(step)
        self.progress.update(self.task, completed=step, epoch=epoch, info=info)
        if self.mode == "lines":
            left = f"  eta {eta}" if eta else ""
            self._say(
                f"[{self.title}] epoch {epoch + 1}/{self.epochs}  step {step}/{self.total}  "
                f"{info}{left}"
            )

    def log_eval(self, step: int, epoch: int, results: dict[str, dict[str, dict]]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "epoch": epoch, **results})
        for split, heads in results.items():
            for head, values in heads.items():
                for key in ("top1", "top5", "loss"):
                    self.tb.add_scalar(f"{split}/{head}_{key}", values[key], step)
        val = results["val"]["avg"]["top1"]
        self._say(
            f"[{self.title}] epoch {epoch + 1}/{self.epochs}  val top-1 {val:.2f}%"
            + "".join(f"  {h} {v['top1']:.2f}" for h, v in results["val"].items() if h != "avg")
            + (f"  ema {results['val_ema']['avg']['top1']:.2f}" if "val_ema" in results else "")
        )
        self._epoch_estimate(epoch)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        for stream in (self.jsonl, self.tb):
            try:
                stream.close()
            except OSError as err:
                # A full disk was already reported by the write that met it (a save, a log
                # line); the buffered tail of the logs is what is lost, not the run's state.
                if not diskspace.is_no_space(err):
                    raise
                log.warning(f"the end of {_stream_name(stream)} was not written: the disk is full")


def _stream_name(stream: Any) -> str:
    return getattr(stream, "name", None) or f"{stream.logdir} (TensorBoard)"


class RateColumn(ProgressColumn):
    """Items per second of a rich task, e.g. `812 img/s`."""

    def __init__(self, unit: str = "img/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}")
