"""What the run says about its teacher before the student starts (`report.teacher_words`)."""

from deit import report


def results(top1, best_epoch, epochs, stopped_early=False):
    best = {"top1": top1, "epoch": best_epoch}
    return {
        "val": {"avg": {"top1": top1}},
        "best": best,
        "epochs": epochs,
        "stopped_early": stopped_early,
    }


def test_a_weak_teacher_still_rising_is_named_with_what_to_do():
    line, warning = report.teacher_words(results(72.7, 6, 7), 100.0)  # issue 25's teacher
    assert line.startswith("teacher: 72.7% top-1 on validation after 7 epoch(s) in 1m 40s")
    assert "still improving" in warning and "--time-budget" in warning
    assert "--distillation none" in warning


def test_a_strong_teacher_is_reported_without_warning():
    line, warning = report.teacher_words(results(99.3, 14, 19, stopped_early=True), 200.0)
    assert "levelled off" in line and "best 99.3% after epoch 15" in line and warning is None


def test_a_weak_teacher_that_levelled_off_is_still_named():
    _, warning = report.teacher_words(results(60.0, 5, 12, stopped_early=True), 60.0)
    assert "only 60.0%" in warning and "still improving" not in warning
