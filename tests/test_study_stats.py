"""bench/study_stats.py: the paired t interval against a hand-computed case, and the cells."""

import math

import pytest


@pytest.fixture(scope="module")
def study_stats(bench_module):
    return bench_module("study_stats")


def test_paired_t_interval_by_hand(study_stats):
    # d = a - b = [2, 3, 1, 4]: mean 2.5, sd sqrt(5/3) = 1.29099; t(3, 0.975) = 3.182446
    # (tables); half width 3.182446 * 1.29099 / 2 = 2.05429.
    p = study_stats.paired_t([3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 3.0, 2.0])
    assert p.n == 4 and p.mean == pytest.approx(2.5)
    assert p.low == pytest.approx(0.44571, abs=1e-4) and p.high == pytest.approx(4.55429, abs=1e-4)
    assert p.beyond_noise
    assert study_stats.paired_cell(p) == "+2.50 [+0.45, +4.55] *"


def test_pairing_removes_the_seed_spread(study_stats):
    # Seeds differ by 10 points, the method by exactly +1 on every seed: a zero-width interval.
    p = study_stats.paired_t([11.0, 21.0, 31.0], [10.0, 20.0, 30.0])
    assert (p.mean, p.low, p.high) == pytest.approx((1.0, 1.0, 1.0))
    noise = study_stats.paired_t([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])
    assert noise.low < 0 < noise.high and not noise.beyond_noise
    assert study_stats.paired_cell(noise).endswith("]")


def test_one_seed_has_no_interval_and_unpaired_input_is_refused(study_stats):
    one = study_stats.paired_t([2.0], [1.0])
    assert one.mean == 1.0 and math.isinf(one.low) and not one.beyond_noise
    with pytest.raises(ValueError, match="pairs"):
        study_stats.paired_t([1.0, 2.0], [1.0])
    assert study_stats.cell([97.0, 98.0, 99.0]) == "98.00 ± 1.00"
