"""What a phase says about its time: after the first timed epoch, the whole phase's estimate."""

from deit import progress
from deit.progress import RunLogger


def test_after_the_first_epoch_it_says_how_long_the_phase_takes(tmp_path, capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    logger = RunLogger(tmp_path, title="student", total_steps=10, epochs=5, mode="lines")
    head = {"top1": 50.0, "top5": 90.0, "loss": 1.0}
    try:
        logger.advance(1)
        logger.first_step(1)  # compiled: timing starts here
        clock[0] += 1.0
        logger.advance(2)  # 1 s per step, 2 steps per epoch
        clock[0] += 2.0  # the evaluation: 2 s
        logger.log_eval(2, 0, {"val": {"avg": head}})
        clock[0] += 5.0
        logger.log_eval(4, 1, {"val": {"avg": head}})  # said once per phase
    finally:
        logger.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "epoch(s) left" in ln]
    # 8 steps at 1 s and 4 evaluations at 2 s are left.
    assert lines == [
        "[student] an epoch takes about 4s (2s of it evaluating): about 16s for the 4 epoch(s) "
        + f"left, ending near {lines[0][-5:]}"
    ]
