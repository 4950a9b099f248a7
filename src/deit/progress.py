"""What a run tells the user and leaves behind: a rich progress bar with loss, lr and images/s,
`metrics.jsonl` (one JSON object per log line), and TensorBoard event files in `tb/`.
Only process 0 of a multi-host run writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


class RunLogger:
    def __init__(self, out: Path, *, title: str, total_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

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
        )
        self.task = self.progress.add_task(title, total=total_steps, epoch=0, info="")
        self.progress.start()

    def advance(self, step: int) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step)

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

    def log_train(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, "epoch": epoch, **values})
        for key, value in values.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        info = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  {values['img_per_s']:.0f} img/s"
        self.progress.update(self.task, completed=step, epoch=epoch, info=info)

    def log_eval(self, step: int, epoch: int, results: dict[str, dict[str, dict]]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "epoch": epoch, **results})
        for split, heads in results.items():
            for head, values in heads.items():
                for key in ("top1", "top5", "loss"):
                    self.tb.add_scalar(f"{split}/{head}_{key}", values[key], step)
        val = results["val"]["avg"]["top1"]
        self.progress.console.print(
            f"epoch {epoch}: val top-1 {val:.2f}%"
            + "".join(f"  {h} {v['top1']:.2f}" for h, v in results["val"].items() if h != "avg")
            + (f"  ema {results['val_ema']['avg']['top1']:.2f}" if "val_ema" in results else "")
        )

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.jsonl.close()
            self.tb.close()


class RateColumn(ProgressColumn):
    """Items per second of a rich task, e.g. `812 img/s`."""

    def __init__(self, unit: str = "img/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}")
