"""Runs that survive: a SIGKILL at any moment, a SIGTERM, a non-finite loss, a kill in the middle
of a save, a resume with the wrong model, a lost process of a multi-process run, a corrupt
checkpoint, a full disk, a slow filesystem and a second run in the same folder.

The end-to-end runs are `python -m deit.cli train` subprocesses on the built-in digits (1,437
training images: 22 steps of 64 per epoch, 44 in all) with the tiny test variant at 16x16, and
are compared with one uninterrupted run of the same seed, which must match bit for bit.
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

from deit import cli, export, train
from deit.checkpoint import SLOW_WRITE_ENV, Checkpoints
from deit.progress import RunLogger

STEPS_PER_EPOCH = 1437 // 64
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
RUN = ["--model", "deit_test_distilled_patch4_32", "--img-size", "16", "--distillation", "none"]
RUN += ["--epochs", "2", "--batch-size", "64", "--seed", "3", "--checkpoint-every", "2"]
RUN += ["--log-every", "5"]


def _env(cache: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **extra)
    if cache is not None:
        # Only to save compile time: the interrupted runs share compiled programs. The reference
        # run compiles on its own, so a compilation that differed between processes still shows.
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


class Run:
    """`deit train --output OUT` in a subprocess; stdout and stderr go to files (a full pipe
    would block the run)."""

    def __init__(
        self,
        out: Path,
        *extra: str,
        cache: Path | None = None,
        env: dict | None = None,
        logs: Path | None = None,
    ) -> None:
        self.out = out
        logs = logs or out.parent
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob(f"{out.name}.*.log")))
        self.log = logs / f"{out.name}.{n}.log"
        argv = [sys.executable, "-m", "deit.cli", "train", "--output", str(out), *RUN, *extra]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                argv, env=_env(cache, **(env or {})), stdout=log, stderr=log
            )

    def text(self) -> str:
        return self.log.read_text()

    def message(self) -> str:
        """The one line `deit train` ends with on an error."""
        lines = [ln for ln in self.text().splitlines() if ln.startswith("deit train:")]
        assert len(lines) == 1, self.text()[-3000:]
        return lines[0]

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the run did not end in {timeout} s:\n{self.text()[-3000:]}")

    def finish(self) -> None:
        assert self.wait() == 0, self.text()[-3000:]

    def wait_for_checkpoint(self, step: int, timeout: float = 600) -> None:
        """Until a finished checkpoint at `step` or later exists (Orbax renames the temporary
        folder to the bare step number only once everything in it is written)."""
        deadline = time.monotonic() + timeout
        while not any(s >= step for s in finished_steps(self.out)):
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended before checkpoint {step}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no checkpoint {step} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.01)


def finished_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def final_params(out: Path) -> dict[str, np.ndarray]:
    return export.flatten(export.load_model(out / "final")[1]["params"])


def assert_same_params(expected: dict[str, np.ndarray], out: Path) -> None:
    got = final_params(out)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def logged_losses(out: Path) -> dict[int, set[float]]:
    """Every training loss `metrics.jsonl` holds, by step (a resumed run logs some steps twice)."""
    losses: dict[int, set[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses.setdefault(record["step"], set()).add(record["loss"])
    return losses


def restore_latest(folder: Path) -> tuple[int, dict, dict]:
    """`(step, state, meta)` of the latest checkpoint in `folder`, laid out as it was saved."""
    ckpts = Checkpoints(folder)
    try:
        step = ckpts.latest_step()
        assert step is not None, f"no checkpoint in {folder}"
        tree = ckpts.manager.item_metadata(step)["state"].tree
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            tree,
            is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict),
        )
        state, meta = ckpts.restore(abstract, step)
    finally:
        ckpts.close()
    return step, state, meta


class Reference:
    """The uninterrupted run, started once for the module and run alongside the first test.
    It checkpoints only at epoch ends: saving every 2 steps must not change the training."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.run = Run(out, "--checkpoint-every", "1000")
        self._params: dict[str, np.ndarray] | None = None

    def params(self) -> dict[str, np.ndarray]:
        if self._params is None:
            self.run.finish()
            self._params = final_params(self.out)
        return self._params


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.run.proc.poll() is None:
        ref.run.proc.kill()
        ref.run.proc.wait()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


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


@pytest.mark.slow
def test_a_lost_process_is_named_by_the_survivor_then_both_resume_exactly(compile_cache, tmp_path):
    """Process 1 of 2 SIGKILLed mid-epoch: process 0 exits within 60 s naming it and the
    command that resumes; both relaunched with --resume end as an uninterrupted 2-process run."""
    one_epoch = ("--epochs", "1", "--checkpoint-every", "4")
    reference = two_processes(tmp_path / "reference", *one_epoch)  # beside the first try
    out = tmp_path / "run"
    first = two_processes(out, *one_epoch, cache=compile_cache)
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
    match = re.fullmatch(
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
    assert not list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
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
