"""Faults of real clusters, end to end through the CLI: a lost process of a 2-process run, a
corrupt latest checkpoint, a full disk, a slow filesystem and a second run in the same folder
(`runs.py`: the subprocess runs and the uninterrupted reference they must match bit for bit).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from runs import (
    RUN,
    STEPS_PER_EPOCH,
    Run,
    assert_same_params,
    final_params,
    finished_steps,
    logged_losses,
    restore_latest,
)

from deit import cli, export
from deit.checkpoint import SLOW_WRITE_ENV, Checkpoints


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(out: Path, *extra: str, cache: Path | None = None) -> list[Run]:
    """`deit train` as 2 processes x 2 devices on loopback (JAX's distributed runtime)."""
    port = free_port()
    launch = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    launch += ("--parallel.heartbeat-timeout", "10", *extra)
    return [Run(out, *launch, "--process-id", str(i), cache=cache) for i in range(2)]


@pytest.fixture
def launched():
    """Runs a test started; any still alive when it ends (a failed assert) are killed, so they
    neither outlive it nor load the tests after it."""
    runs: list[Run] = []
    yield runs
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.mark.slow
def test_a_lost_process_is_named_by_the_survivor_then_both_resume_exactly(
    compile_cache, tmp_path, launched
):
    """Process 1 of 2 SIGKILLed mid-epoch: process 0 exits within 60 s naming it and the
    command that resumes; both relaunched with --resume end as an uninterrupted 2-process run."""
    one_epoch = ("--epochs", "1", "--checkpoint-every", "4")
    reference = two_processes(tmp_path / "reference", *one_epoch)  # beside the first try
    out = tmp_path / "run"
    first = two_processes(out, *one_epoch, cache=compile_cache)
    launched += reference + first
    first[0].wait_for_checkpoint(8)
    os.kill(first[1].proc.pid, signal.SIGKILL)
    assert first[1].wait() == -signal.SIGKILL
    assert first[0].wait(timeout=60) == 4  # the watchdog's exit, not a hang in a collective
    line = first[0].message()
    assert "process 1 of the 2 processes was lost (no sign of life for 10 s)" in line, line
    assert "--resume" in line and f"--output {out}" in line, line
    assert "Traceback" not in first[0].text()
    saved = max(finished_steps(out))
    assert 8 <= saved < STEPS_PER_EPOCH
    for run in reference:
        run.finish()
    again = two_processes(out, *one_epoch, "--resume", cache=compile_cache)
    launched += again
    for run in again:
        run.finish()
    assert_same_params(final_params(reference[0].out), out)
    results = json.loads((out / "results.json").read_text())
    assert results["val"] == json.loads((reference[0].out / "results.json").read_text())["val"]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte flipped in the middle, the size unchanged
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    reference, compile_cache, tmp_path, capsys
):
    reference.params()  # finished: its checkpoints are at 22 and 44 (epoch ends)
    out = tmp_path / "run"
    shutil.copytree(reference.out / "checkpoints", out / "checkpoints")
    shutil.copy(reference.out / "config.json", out / "config.json")
    damage(out / "checkpoints" / "44" / "state" / "_sharding", "truncate")
    resumed = Run(out, "--resume", "--checkpoint-every", "1000", cache=compile_cache)
    resumed.finish()
    notes = [ln for ln in resumed.text().splitlines() if "is unusable" in ln]
    assert notes == [
        f"checkpoint {out / 'checkpoints' / '44'} is unusable (state/_sharding has "
        f"{(out / 'checkpoints-corrupt' / '44' / 'state' / '_sharding').stat().st_size} bytes, "
        f"{(reference.out / 'checkpoints' / '44' / 'state' / '_sharding').stat().st_size} were "
        "written); resuming from the previous complete one, step 22"
    ]
    assert_same_params(reference.params(), out)  # 22 steps again: bit for bit
    results = json.loads((out / "results.json").read_text())
    assert results["val"] == json.loads((reference.out / "results.json").read_text())["val"]

    # Neither checkpoint usable: refused, naming both, with nothing changed.
    damage(out / "checkpoints" / "44" / "state" / "_sharding", "truncate")
    chunk = next((out / "checkpoints" / "22" / "state" / "d").iterdir())
    damage(chunk, "flip")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    argv = ["train", "--output", str(out), *RUN, "--resume"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deit train: error: no usable checkpoint to resume from (tried "), err
    assert f"{out / 'checkpoints' / '44'}: state/_sharding has" in err
    assert f"{out / 'checkpoints' / '22'}: state/d/{chunk.name} differs from what was" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only: skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """A file that takes every free byte of `disk`."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_the_run_cleanly_then_it_resumes_exactly(
    reference, compile_cache, small_disk, tmp_path
):
    out = small_disk / "run"
    # Only checkpoints and the epoch's end write to the disk between steps 22 and 44.
    run = Run(out, "--log-every", "1000", cache=compile_cache, logs=tmp_path)
    run.wait_for_checkpoint(STEPS_PER_EPOCH + 2)
    filler = fill(small_disk)
    assert run.wait() == 2
    line = run.message()
    match = re.match(  # a prefix: Orbax's threads may print onto the same line
        rf"deit train: error: no space left on the device for {out}/checkpoints/(\d+): it needs "
        r"about ([\d.]+) MiB, ([\d.]+) MiB are free; free some space, then resume the run "
        r"\(--resume\)",
        line,
    )
    assert match, line
    assert float(match[2]) > float(match[3])
    # What was written before stays whole: the latest checkpoint and the best model.
    step, state, _ = restore_latest(out / "checkpoints")
    assert STEPS_PER_EPOCH < step < int(match[1]) and int(state["step"]) == step
    export.load_model(out / "best")
    # The failed save's temporary folder may outlive the run (Orbax's writer threads can still
    # add to it after it is removed); a resume ignores it (test_resume.py's leftover test).
    filler.unlink()
    Run(out, "--resume", cache=compile_cache, logs=tmp_path).finish()
    assert_same_params(reference.params(), out)


@pytest.mark.slow
def test_slow_checkpoint_writes_do_not_stall_training_and_a_second_run_is_refused(tmp_path):
    """Every write sleeps 3 s in Orbax's background thread: the loop steps on meanwhile, each
    save waits for the one before, the last one is waited for at exit. A second `--resume`
    into the folder while this run lives is refused, and changes nothing."""
    out = tmp_path / "run"
    slow = {SLOW_WRITE_ENV: "3"}
    args = ("--epochs", "1", "--checkpoint-every", "8", "--log-every", "1")
    run = Run(out, *args, env=slow)
    deadline = time.monotonic() + 300
    while not (out / "run.lock").is_file() or not (out / "config.json").is_file():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.05)
    config = (out / "config.json").read_bytes()
    second = Run(out, *args, "--resume")
    assert second.wait() == 2
    assert second.message() == (
        f"deit train: error: {out} is in use by a live run (pid {run.proc.pid} on host "
        f"{os.uname().nodename}, since "
        + second.message().partition(", since ")[2].partition(")")[0]
        + "); wait for it to end, or choose another --output"
    )
    assert (out / "config.json").read_bytes() == config
    assert json.loads((out / "run.lock").read_text())["pid"] == run.proc.pid
    # While checkpoint 8 is being written (its temporary folder), steps after it are logged.
    stepped_on = False
    while run.proc.poll() is None and not stepped_on:
        writing = list((out / "checkpoints").glob("8.orbax-checkpoint-tmp*"))
        logged = logged_losses(out) if (out / "metrics.jsonl").is_file() else {}
        stepped_on = bool(writing) and max(logged, default=0) >= 10
        time.sleep(0.05)
    assert stepped_on, run.text()[-3000:]
    run.finish()
    assert finished_steps(out) == [8, 16, STEPS_PER_EPOCH]  # none dropped, the last waited for
    ckpts = Checkpoints(out / "checkpoints")
    assert all(ckpts.problem(s) is None for s in (8, 16, STEPS_PER_EPOCH))
    ckpts.close()
    assert not (out / "run.lock").exists()
