"""End-to-end `deit train` runs for tests/test_resume.py and tests/test_faults.py: subprocesses on
the built-in digits (1,437 training images: 22 steps of 64 per epoch, 44 in all) with the tiny
test variant at 16x16, compared with one uninterrupted run of the same seed (`Reference`), which
must match bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from deit import export
from deit.checkpoint import Checkpoints

STEPS_PER_EPOCH = 1437 // 64
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
RUN = ["--model", "deit_test_distilled_patch4_32", "--img-size", "16", "--distillation", "none"]
RUN += ["--epochs", "2", "--batch-size", "64", "--seed", "3", "--checkpoint-every", "2"]
RUN += ["--log-every", "5"]


def xla_flags(devices: int | None) -> str:
    """The test run's XLA_FLAGS (tests/conftest.py) with `devices` fake CPU devices (None: the
    count left to the process)."""
    device_count = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(device_count)]
    return " ".join(kept + ([f"{device_count}={devices}"] if devices else []))


def _env(cache: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), **extra)
    # Every run, the uninterrupted reference included, shares the test run's compilation cache
    # (tests/conftest.py), or `cache` where a test names one: a resumed run that traced another
    # program (other shapes, shardings or donation) still compiles it anew, under another key,
    # and its numbers still differ from the reference's.
    if cache is not None:
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


@pytest.fixture(scope="session")
def compile_cache() -> Path:
    """The test run's shared compilation cache (tests/conftest.py)."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
