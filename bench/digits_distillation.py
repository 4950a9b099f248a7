"""The distillation table on the built-in set (docs/distillation_study.md): for each seed, the
ResNet teacher and the DeiT student without distillation, with soft and with hard distillation,
equal budget (the `digits` recipe). Writes `bench/results/digits_distillation.{json,md}`.

    python bench/digits_distillation.py --seeds 0 1 2 --out runs/table
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from deit import recipes
from deit.losses import LossConfig
from deit.run import train_and_evaluate

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Study:
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds: each trains one teacher and three students."""
    out: str = "runs/table"
    """Folder of the runs."""


def main(args: Study) -> None:
    rows: dict[str, list[float]] = {"teacher (ResNet-8)": []}
    runs = []
    for seed in args.seeds:
        base = dataclasses.replace(recipes.digits(), seed=seed)
        teacher_dir = None
        for kind in ("hard", "soft", "none"):
            out = Path(args.out) / f"seed{seed}_{kind}"
            teacher = dataclasses.replace(base.teacher, path=teacher_dir)
            cfg = dataclasses.replace(
                base, loss=LossConfig(distillation=kind), output=str(out), teacher=teacher
            )
            tick = time.perf_counter()
            summary = train_and_evaluate(cfg)
            seconds = time.perf_counter() - tick
            if kind == "hard":
                teacher_dir = str(out / "teacher")
                rows["teacher (ResNet-8)"].append(summary["teacher"]["top1"])
            for head in ("cls", "dist", "avg"):
                rows.setdefault(f"{kind}/{head}", []).append(summary["val"][head]["top1"])
            runs.append({"seed": seed, "kind": kind, "seconds": seconds, "summary": summary})
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "digits_distillation.json").write_text(json.dumps(runs, indent=2))
    lines = ["| model | class head | dist. head | averaged heads |", "|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {spread:.2f}"

    lines.append(f"| teacher (ResNet-8) | | | {cell(rows['teacher (ResNet-8)'])} |")
    names = {"none": "DeiT, no distillation", "soft": "DeiT, soft", "hard": "DeiT, hard"}
    for kind, name in names.items():
        cells = " | ".join(cell(rows[f"{kind}/{h}"]) for h in ("cls", "dist", "avg"))
        lines.append(f"| {name} | {cells} |")
    table = "\n".join(lines)
    (results / "digits_distillation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main(tyro.cli(Study))
