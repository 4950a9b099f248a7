"""Runs that survive on one machine: a SIGKILL at any moment, a SIGTERM or Ctrl-C in every phase,
a non-finite loss, a kill in the middle of a save, a resume with the wrong model or with nothing
saved (`runs.py`: the subprocess runs and the uninterrupted reference they must match bit for
bit). The faults of clusters are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import (
    RUN,
    STEPS_PER_EPOCH,
    TOTAL_STEPS,
    Run,
    _env,
    assert_same_params,
    final_params,
    finished_steps,
    logged_losses,
    restore_latest,
)

from deit import cli, train
from deit.checkpoint import Checkpoints
from deit.progress import RunLogger


@pytest.mark.slow
def test_sigkill_at_two_points_then_resume_is_bit_identical(reference, compile_cache, tmp_path):
    out = tmp_path / "run"
    first = Run(out, cache=compile_cache)
    first.wait_for_checkpoint(6)
    os.kill(first.proc.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    killed_at = max(finished_steps(out))
    assert killed_at < STEPS_PER_EPOCH  # inside the first epoch

    second = Run(out, "--resume", cache=compile_cache)
    second.wait_for_checkpoint(STEPS_PER_EPOCH + 6)
    # The killed run's lock was left behind; the kernel dropped its flock, so it is taken over.
    assert f"took over the lock of {out} from a run that is no longer alive" in second.text()
    os.kill(second.proc.pid, signal.SIGKILL)
    assert second.wait() == -signal.SIGKILL
    killed_again_at = max(finished_steps(out))
    assert STEPS_PER_EPOCH < killed_again_at < TOTAL_STEPS  # past an epoch end, not finished
    assert not (out / "final").exists()

    Run(out, "--resume", cache=compile_cache).finish()
    assert_same_params(reference.params(), out)
    # Steps logged before a kill and again after the resume agree with the reference too.
    expected = logged_losses(reference.out)
    got = logged_losses(out)
    assert set(expected) <= set(got)
    for step, losses in expected.items():
        assert len(losses) == 1 and got[step] == losses, step
    results = json.loads((out / "results.json").read_text())
    assert results["val"] == json.loads((reference.out / "results.json").read_text())["val"]


@pytest.mark.slow
def test_sigterm_saves_and_says_how_to_resume(reference, compile_cache, tmp_path):
    out = tmp_path / "run"
    run = Run(out, cache=compile_cache)
    run.wait_for_checkpoint(8)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    message = [line for line in run.text().splitlines() if line.startswith("deit train:")]
    assert len(message) == 1, run.text()[-3000:]
    stopped = re.search(r"stopped by SIGTERM after step (\d+) \(student training", message[0])
    assert stopped, message[0]
    assert f"deit train --resume --output {out.absolute()}" in message[0]
    step = int(stopped.group(1))
    assert step < TOTAL_STEPS
    # The checkpoint of the step it stopped at is written and is the latest one.
    assert max(finished_steps(out)) == step
    assert restore_latest(out / "checkpoints")[0] == step

    Run(out, "--resume", cache=compile_cache).finish()
    assert_same_params(reference.params(), out)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, capsys):
    """The step where the loss first turns NaN is named (the device-side flag), although the
    loop first looks at it at the save after it; nothing non-finite is ever saved."""
    poison_from = 5
    real = train.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def train_step(state, batch, teacher=None):
            new, metrics = step_fn(state, batch, teacher)
            bad = new.step >= poison_from
            nan = lambda x: jnp.where(bad, jnp.nan, x)
            metrics = dict(metrics, loss=nan(metrics["loss"]))
            return new.replace(params=jax.tree_util.tree_map(nan, new.params)), metrics

        return train_step

    monkeypatch.setattr(train, "make_train_step", poisoned)
    out = tmp_path / "run"
    # Logged at step 3, saved at 2 and 4; step 5 is neither: the flag is read at the save of 6.
    argv = ["train", "--output", str(out), *RUN, "--epochs", "1", "--log-every", "3"]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "deit train: error: the loss or the parameters became non-finite (NaN/inf) at step 5; "
        "stopped without saving them"
    ), err
    assert "last good checkpoint (step 4)" in err and "--resume" in err
    assert finished_steps(out) == [2, 4]
    assert not any(p.name.startswith(("5", "6")) for p in (out / "checkpoints").iterdir())
    step, state, _ = restore_latest(out / "checkpoints")
    assert step == 4 and int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if x["kind"] == "train"] == [2, 3, 4]  # none past the bad one


SAVER = """
import sys
import jax.numpy as jnp
from deit.checkpoint import Checkpoints

ckpts = Checkpoints(sys.argv[1], keep=2)
start = (ckpts.latest_step() or 0) + 1
for step in range(start, start + 10_000):
    state = {"w": jnp.full((1024, 1024), step, jnp.float32), "b": jnp.arange(4096.0) * step}
    ckpts.save(step, state, {"step": step})
    print(step, flush=True)
"""


def expected_saved(step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((1024, 1024), step, np.float32),
        "b": np.arange(4096.0, dtype=np.float32) * step,
    }


@pytest.mark.slow
def test_a_kill_during_saves_leaves_a_usable_checkpoint(tmp_path):
    """4 MB saved over and over, killed at random moments: each time the latest checkpoint
    restores to exactly what was saved under its step, and the next process carries on."""
    folder = tmp_path / "checkpoints"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    delays = np.random.default_rng(0).uniform(0.0, 0.6, size=4)
    last = 0
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder)],
            env=_env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        first = int(proc.stdout.readline())  # saving has begun
        assert first == last + 1
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        step, state, meta = restore_latest(folder)
        assert step >= first - 1 and meta == {"step": step}
        for key, value in expected_saved(step).items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{key} at step {step}")
        last = step


def test_a_leftover_temporary_folder_is_ignored(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpts = Checkpoints(folder)
    for step in (1, 2):
        ckpts.save(step, {k: jnp.asarray(v) for k, v in expected_saved(step).items()}, {})
    ckpts.close()
    # What a kill in the middle of writing step 3 leaves behind.
    partial = folder / "3.orbax-checkpoint-tmp"
    shutil.copytree(folder / "2", partial)
    for marker in [*partial.rglob("commit_success.txt"), *partial.rglob("*METADATA")]:
        marker.unlink()
    for chunk in (partial / "state" / "d").iterdir():
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    step, state, _ = restore_latest(folder)
    assert step == 2
    np.testing.assert_array_equal(state["w"], expected_saved(2)["w"])
    ckpts = Checkpoints(folder)
    ckpts.save(3, {k: jnp.asarray(v) for k, v in expected_saved(3).items()}, {}, wait=True)
    ckpts.close()
    assert finished_steps(tmp_path) == [1, 2, 3] and not partial.exists()
    assert restore_latest(folder)[0] == 3


@pytest.mark.slow
def test_resume_with_another_model_names_the_differing_arrays(reference, tmp_path, capsys):
    reference.params()  # the reference run is finished
    out = tmp_path / "run"
    shutil.copytree(reference.out / "checkpoints", out / "checkpoints")
    argv = ["train", "--output", str(out), *RUN, "--resume", "--model", "deit_test_patch4_32"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the header, then the one error
    err = lines[-1]
    assert [line for line in lines if line.startswith("deit train:")] == [err], lines
    assert err.startswith("deit train: error: the checkpoint at step 44")
    assert "is of another model" in err
    assert "params/dist_token" in err and "params/pos_embed (1, 18, 32) != (1, 17, 32)" in err


def image_folder_with_bad_images(root: Path) -> Path:
    """2 classes x 24 random 12x12 PNGs per split; two unreadable files in train, one in val."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(24):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.png")
    for path in ("train/cat/05.png", "train/dog/17.png", "val/dog/03.png"):
        (root / path).write_bytes(b"not a png")
    return root


@pytest.mark.slow
def test_sigkill_with_skipped_bad_images_then_resume_is_bit_identical(compile_cache, tmp_path):
    data = image_folder_with_bad_images(tmp_path / "data")
    # 48 images, batch 8: 6 steps per epoch, 12 in all; a checkpoint every 2 steps.
    extra = ("--data", str(data), "--bad-images", "skip", "--batch-size", "8", "--workers", "1")
    extra += ("--recipe", "imagenet")  # as written for (this small a folder would get `small`)
    reference = Run(tmp_path / "reference", *extra, cache=compile_cache)
    reference.finish()
    out = tmp_path / "run"
    first = Run(out, *extra, cache=compile_cache)
    first.wait_for_checkpoint(8)
    os.kill(first.proc.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert max(finished_steps(out)) < 12
    Run(out, *extra, "--resume", cache=compile_cache).finish()
    assert_same_params(final_params(reference.out), out)
    expected = json.loads((reference.out / "results.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results["val"] == expected["val"]
    assert results["val"]["avg"]["count"] == 47
    assert str(data / "val" / "dog" / "03.png") in expected["bad_images"]
    # The resumed run met (at least) the bad images of the steps after the kill, the same ones.
    assert set(results["bad_images"]) <= set(expected["bad_images"])


# ---------------------------------------------------------------------------------------------
# Stopping in each phase: the hint names the run's own --output, and --resume never guesses


def test_resume_with_nothing_saved_is_an_error_naming_the_folder(tmp_path, capsys):
    typo = tmp_path / "runz"
    assert cli.main(["train", "--resume", "--output", str(typo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"deit train: error: nothing to resume in {typo}: no checkpoint of a run (it does not "
        "exist); expected the output folder of a stopped run, or start a new run without --resume"
    )
    typo.mkdir()
    (typo / "config.json").write_text("{}")
    (typo / "tb").mkdir()
    assert cli.main(["train", "--resume", "--output", str(typo)]) == 2
    assert "(it holds config.json, tb/)" in capsys.readouterr().err


def _signal_at(monkeypatch, title: str, step: int) -> None:
    """SIGINT to this process right after `title`'s progress line of `step` (what Ctrl-C does,
    at a known moment)."""
    real = RunLogger.log_train

    def log_train(self, at, epoch, values):
        real(self, at, epoch, values)
        if self.title == title and at == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLogger, "log_train", log_train)


def test_ctrl_c_in_the_teacher_phase_names_the_run_folder(monkeypatch, tmp_path, capsys):
    """The teacher trains into OUTPUT/teacher; a stop there is resumed with OUTPUT. The same
    in-process run checks the header, its warnings and the line progress outside a terminal."""
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--model", "deit_test_distilled_patch4_32"]
    argv += ["--img-size", "16", "--epochs", "1", "--teacher-epochs", "2", "--batch-size", "256"]
    argv += ["--log-every", "2", "--workers", "0", "--optim.lr", "None", "--lr", "1e-5"]
    _signal_at(monkeypatch, "teacher", 5)  # the epoch's last step: its evaluation comes next
    assert cli.main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    # Before any work, the header says what will happen, with warnings for what cannot learn.
    header = "\n".join(err[:12])
    assert f"teacher    resnet8, trained first for 2 epoch(s) into {out / 'teacher'}" in header
    assert "data       digits: 10 classes, 1,437 train / 360 val images at 16x16" in header
    assert "batch      256 global (128 per device), 5 steps per epoch, 1 epochs; lr 5e-06" in header
    assert "devices    2 cpu device(s), 1 process(es)" in header
    assert "lr scales to 5e-06" in header and "below 1e-05: training will barely move" in header
    assert "the teacher trains first for 2 epochs, longer than the student's 1" in header
    assert "set --optim.lr (an absolute lr)" in header and "set --teacher.optim.epochs" in header
    # Outside a terminal: plain lines, each naming its phase; the estimate after the first steps.
    assert "[teacher] epoch 1/2  step 4/10  loss" in "\n".join(err)
    assert any(
        line.startswith("[teacher] ") and "s/step over 1 step(s) after the first" in line
        for line in err
    )
    assert err[-1] == (
        "deit train: stopped by SIGINT after step 5 (teacher evaluation, epoch 1); a checkpoint "
        f"is saved in {out / 'teacher' / 'checkpoints'}; continue with: deit train --resume "
        f"--output {out}"
    )
    assert finished_steps(out / "teacher") == [5]  # the epoch's state, saved at once
    assert not (out / "checkpoints").exists()


def test_sigint_during_evaluation_with_workers_stops_within_5_s(tmp_path):
    out = tmp_path / "run"
    run = Run(out, "--workers", "2", "--checkpoint-every", "1000")
    deadline = time.monotonic() + 300
    # The progress line of the last step: the second epoch's evaluation (compiled in the first)
    # starts now.
    while f"step {TOTAL_STEPS}/{TOTAL_STEPS}" not in run.text():
        assert run.proc.poll() is None, run.text()[-3000:]
        assert time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = run.wait(timeout=60)
    took = time.monotonic() - sent
    assert code == 128 + signal.SIGINT, run.text()[-3000:]
    assert took < 5, f"{took:.1f} s:\n{run.text()[-3000:]}"
    last = run.text().strip().splitlines()[-1]  # the hint comes last, nothing buries it
    assert last == (
        f"deit train: stopped by SIGINT after step {TOTAL_STEPS} (student evaluation, epoch 2); "
        f"a checkpoint is saved in {out.absolute() / 'checkpoints'}; continue with: deit train "
        f"--resume --output {out.absolute()}"
    )
    # The trained state of the epoch is saved (the first epoch's end was saved too).
    assert finished_steps(out) == [STEPS_PER_EPOCH, TOTAL_STEPS]
    assert "Traceback" not in run.text()
