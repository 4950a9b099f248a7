"""Statistics of the distillation study: mean ± std per cell and the paired difference of two
methods over the same seeds with a 95% paired t interval.

Paired because a seed fixes everything but the method (the labelled subset, the teacher, the
init, the data order), so `distilled - undistilled` per seed removes the seed-to-seed spread
that an unpaired comparison of two means carries.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Paired:
    """`mean` of the per-seed differences `a - b`, its 95% interval `(low, high)`, `n` seeds."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Paired:
    """The paired t interval of `mean(a - b)`: `d̄ ± t_{n-1, (1+c)/2} · s_d / √n`, `a[i]` and
    `b[i]` measured with the same seed. With one pair the interval is unbounded."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_t needs pairs: {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean, sd = mean_std(d)
    if n == 1:
        return Paired(mean, -math.inf, math.inf, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n)


def cell(values: Sequence[float]) -> str:
    """`97.41 ± 0.58` (mean ± std over seeds)."""
    mean, spread = mean_std(values)
    return f"{mean:.2f} ± {spread:.2f}"


def paired_cell(p: Paired) -> str:
    """`+0.65 [-0.10, +1.40]`, starred when the interval excludes 0."""
    star = " *" if p.beyond_noise else ""
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}]{star}"
