"""Pictures of a run: training curves (loss and lr per step, val top-1 per head per epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x["kind"] == "train"], [x for x in lines if x["kind"] == "eval"]


def plot_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """`RUN/curves.png`: training loss, learning rate, and val top-1 of each head (and EMA)."""
    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run} has no metrics.jsonl; expected the output folder of deit train")
    train, evals = read_metrics(run)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [x["step"] for x in train]
    axes[0].plot(steps, [x["loss"] for x in train], label="total")
    axes[0].plot(steps, [x["base_loss"] for x in train], label="class head (labels)")
    if any(x["kd_loss"] for x in train):
        axes[0].plot(steps, [x["kd_loss"] for x in train], label="dist head (teacher)")
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[0].legend()
    axes[1].plot(steps, [x["lr"] for x in train])
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    epochs = [x["epoch"] + 1 for x in evals]
    for split in ("val", "val_ema"):
        for head in ("cls", "dist", "avg"):
            values = [x[split][head]["top1"] for x in evals if split in x and head in x[split]]
            if len(values) == len(epochs) and values:
                style = "--" if split == "val_ema" else "-"
                name = {"cls": "class head", "dist": "dist head", "avg": "averaged"}[head]
                label = name + (" (EMA)" if split == "val_ema" else "")
                axes[2].plot(epochs, values, style, label=label)
    axes[2].set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    axes[2].legend()
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
