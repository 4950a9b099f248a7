"""The time budget's arithmetic on fixed step times (`deit.budget`): parsing, the split, the
epochs that fit after a timed first epoch, the plateau stop; and a tiny budgeted run."""

import json

import pytest

from deit import budget
from deit.errors import InputError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900), ("900s", 900), ("900", 900), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150)],
)
def test_durations_parse(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15x", "m", "0m", "15 minutes", "-5m"])
def test_bad_durations_name_the_setting(text):
    with pytest.raises(InputError, match="time_budget"):
        budget.parse_duration(text)


def test_the_teacher_gets_a_third():
    assert budget.split(900) == (300, 600)
    assert budget.split(900, 0.5) == (450, 450)


def test_an_epoch_is_its_steps_evaluation_and_save():
    # 23 steps of 0.5 s, 8 evaluation batches of 0.25 s, a 1 s checkpoint.
    assert budget.epoch_seconds(23, 0.5, 8, 0.25, 1.0) == 14.5


def test_epochs_fill_the_share_without_passing_it():
    share = budget.PhaseBudget(300, max_epochs=150)
    # First epoch (compiles included) took 20 s; each further one 14.5 s: 280 s left -> 19 more.
    assert budget.epochs_within(share, 20.0, 14.5) == 1 + 19
    assert 20.0 + 19 * 14.5 <= 300 < 20.0 + 20 * 14.5  # ends inside, one more would pass it
    # Bounds: a fast phase stops at its ceiling, a slow one still runs its first epoch.
    assert budget.epochs_within(share, 1.0, 0.1) == 150
    assert budget.epochs_within(share, 400.0, 14.5) == 1
    assert budget.epochs_within(budget.PhaseBudget(300, min_epochs=3), 400.0, 14.5) == 3


def test_the_teachers_share_is_a_third_or_its_least_epochs_up_to_a_half():
    """15 minutes: 300 s for the teacher, or as long as 30 epochs take up to 450 s."""
    share = budget.teacher_budget(900, 150)
    assert (share.seconds, share.max_seconds, share.min_epochs) == (300, 450, 30)
    assert share.plateau
    assert budget.epochs_within(share, 20.0, 8.0) == 1 + 35  # a third buys more than 30
    assert budget.epochs_within(share, 20.0, 10.0) == 30  # 29 in a third: 30, within a half
    assert budget.epochs_within(share, 20.0, 20.0) == 1 + 21  # 30 do not fit in a half
    assert budget.epochs_within(budget.teacher_budget(900, 12), 20.0, 1.0) == 12  # its ceiling
    assert budget.teacher_budget(60, 10).min_epochs == 10


def test_a_share_counts_what_went_before_its_phase():
    late = budget.teacher_budget(900, 150).less(40.0)
    assert (late.seconds, late.max_seconds) == (260, 410)
    assert budget.PhaseBudget(30).less(50.0).seconds == 0
    assert budget.epochs_within(budget.PhaseBudget(30).less(50.0), 5.0, 1.0) == 1


def test_a_strict_phase_is_trimmed_when_its_epochs_slow_down():
    share = budget.PhaseBudget(100.0, strict=True)
    assert budget.trimmed_epochs(share, 20.0, 2, 10, 10.0) == 10  # ends at 100 s
    assert budget.trimmed_epochs(share, 20.0, 2, 10, 10.6) == 10  # within half an epoch
    assert budget.trimmed_epochs(share, 20.0, 2, 10, 11.0) == 2 + 7  # 108 s: 7 more fit
    assert budget.trimmed_epochs(share, 99.0, 2, 10, 10.0) == 3  # at least one more
    assert budget.trimmed_epochs(share, 20.0, 2, 10, 1.0) == 10  # never lengthened
    assert budget.trimmed_epochs(share, 20.0, 2, 10, 0.0) == 10


def test_the_measured_epoch_is_the_mean_after_the_first(monkeypatch):
    clock = budget.EpochClock(0.0)
    times = iter([30.0, 37.0, 45.0, 51.0, 70.0, 72.0, 74.0, 77.0])
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(times))
    clock.epoch_end()
    clock.epoch_end()
    assert clock.measured_epoch() is None  # the first epoch carries the compiles; one is few
    for _ in range(2):
        clock.epoch_end()
    assert clock.measured_epoch() == 7.0
    clock.recompiled()  # the epoch ending at 70 s carries a new compile: measured from its end
    clock.epoch_end()
    clock.epoch_end()
    assert clock.measured_epoch() is None
    clock.epoch_end()
    clock.epoch_end()
    assert clock.measured_epoch() == 7.0 / 3


def test_the_process_age_counts_from_the_launch():
    import subprocess
    import sys

    code = "import time; time.sleep(1.0); from deit import budget; print(budget.process_age())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                               text=True, check=True).stdout)  # fmt: skip
    assert 1.0 <= age < 30.0


def test_the_clock_reads_a_later_epoch_from_the_first_ones_steady_part():
    clock = budget.EpochClock(0.0)
    clock.marks = {"first_step": 10.0, "train_end": 21.0, "first_eval": 23.0, "eval_end": 24.5}
    clock.marks["saved"] = 25.0
    # 12 steps: 11 after the first in 11 s; 4 eval batches: 3 after the first in 1.5 s.
    assert clock.epoch_time(12, 4) == pytest.approx(12 * 1.0 + 4 * 0.5 + 0.5)
    assert not clock.mark("saved") and clock.marks["saved"] == 25.0  # only the first counts


def test_a_plateau_is_patience_evaluations_without_gain():
    p = budget.Plateau(patience=3, min_gain=0.1)
    seen = [p.update(x) for x in [20.0, 60.0, 80.0, 80.05, 79.0, 80.0]]
    assert seen == [False, False, False, False, False, True]
    assert "best 80.0% at epoch 3" in p.text("teacher", 6, 40)
    assert budget.Plateau(patience=10).update(100.0)  # nothing left to gain
    assert budget.patience_for(10) == 4 and budget.patience_for(60) == 12


def test_a_budgeted_run_is_sized_after_its_first_epoch(tmp_path, capsys):
    """A run given 0.1 s after its first epoch: the ceiling of 5 epochs becomes 1, the schedule
    and config.json record it, and the phase says so."""
    import dataclasses

    from deit import data, recipes
    from deit.losses import LossConfig
    from deit.model import create_model
    from deit.train import fit

    base = recipes.digits()
    cfg = dataclasses.replace(
        base,
        output=str(tmp_path / "run"),
        batch_size=256,
        loss=LossConfig(distillation="none"),
        optim=dataclasses.replace(base.optim, epochs=5, warmup_epochs=1),
        data=dataclasses.replace(base.data, randaugment=None),
        progress="lines",
    )
    train, val = data.load_sources(cfg.data)
    model = create_model("deit_test_distilled_patch4_32", num_classes=10, img_size=16)
    results = fit(model, cfg, train, val, budget=budget.PhaseBudget(0.1, max_epochs=5))
    assert results["epochs"] == 1 and results["steps"] == len(train) // 256
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["epochs"] == 1
    assert "1 epoch(s) in all (at most 5)" in capsys.readouterr().err
