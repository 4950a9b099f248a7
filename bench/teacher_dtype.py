"""The distillation training step with a float32 student and its ResNet-18 teacher in float32
or in bfloat16 (`teacher.dtype`), interleaved in one run; medians of images/s. Writes
`bench/results/teacher_dtype_<vendor>.md` (`deit.compiler.cpu_vendor`).

    python bench/teacher_dtype.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

from speed import train_case
from user_jit import _cpu

from deit.compiler import cpu_vendor

HERE = Path(__file__).parent
TI = "deit_tiny_distilled_patch16_224"


def main(batch: int = 32, rounds: int = 5, seconds: float = 2.0) -> None:
    cases = {t: train_case(TI, batch, "float32", teacher_dtype=t) for t in ("float32", "bfloat16")}
    rates: dict[str, list[float]] = {t: [] for t in cases}
    for _ in range(rounds):
        for t, case in cases.items():
            images, elapsed, _ = case.run(seconds)
            rates[t].append(images / elapsed)
    med = {t: statistics.median(r) for t, r in rates.items()}
    lines = [
        f"DeiT-Ti distilled float32 student, ResNet-18 teacher, batch {batch}, {_cpu()}, "
        f"median of {rounds} interleaved rounds",
        "",
        "| teacher dtype | train step img/s |",
        "|---|---|",
        *(f"| {t} | {m:.1f} |" for t, m in med.items()),
        "",
        f"bfloat16 teacher / float32 teacher: {med['bfloat16'] / med['float32']:.2f}x",
    ]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"teacher_dtype_{cpu_vendor()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
