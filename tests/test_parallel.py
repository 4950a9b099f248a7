"""Data parallelism over faked CPU devices and two local processes (JAX's distributed runtime on
loopback). Each configuration runs `parallel_worker.py` in its own process, since the device
count is fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from runs import xla_flags

from deit import export, parallel

WORKER = Path(__file__).with_name("parallel_worker.py")
pytestmark = pytest.mark.slow


def run_worker(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=xla_flags(None))  # the worker sets its device count
    return subprocess.run(
        [sys.executable, str(WORKER), "--output", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )


def losses(run: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([x["loss"] for x in lines if x["kind"] == "train"])


def final_params(run: Path) -> dict:
    return export.load_model(run / "final")[1]["params"]


def assert_same_params(a: dict, b: dict) -> None:
    # Adam divides by sqrt(v): where a gradient is ~0 (fresh biases, rarely used weights),
    # summation-order noise can move a parameter by a fraction of one lr-sized step (seen: up to
    # 1.7e-4 on 1 of 49k elements over 5 steps of lr 3e-3). A missing all-reduce or a wrong shard
    # moves nearly every parameter by ~lr (3e-3), far outside both bounds.
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diffs = np.concatenate(
        [
            np.abs(np.asarray(x) - np.asarray(y)).ravel()
            for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
        ]
    )
    assert diffs.max() < 1e-3, f"max |difference| {diffs.max():.2e}"
    assert np.mean(diffs > 1e-4) < 1e-3, f"{np.mean(diffs > 1e-4):.2%} of parameters differ > 1e-4"


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four") / "run"
    run_worker(out, "--devices", "4")
    return out


def test_one_device_equals_four(tmp_path, four_devices):
    one = tmp_path / "one"
    run_worker(one, "--devices", "1")
    assert len(losses(one)) == 5
    np.testing.assert_allclose(losses(one), losses(four_devices), rtol=1e-5)
    assert_same_params(final_params(one), final_params(four_devices))


def test_fsdp_equals_replicated(tmp_path, four_devices):
    sharded = tmp_path / "fsdp"
    run_worker(sharded, "--devices", "4", "--fsdp")
    np.testing.assert_allclose(losses(sharded), losses(four_devices), rtol=1e-5)
    assert_same_params(final_params(sharded), final_params(four_devices))


@pytest.fixture(scope="module")
def soft_one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soft") / "one"
    run_worker(out, "--devices", "1", "--distillation", "soft")
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_distillation_on_one_device_equals_four(tmp_path, soft_one_device, fsdp):
    """The teacher is placed on the mesh (replicated, or split like the student under FSDP):
    soft distillation, whose loss depends on every teacher logit, logs the same losses."""
    one = soft_one_device
    four = tmp_path / "four"
    run_worker(four, "--devices", "4", "--distillation", "soft", *(["--fsdp"] if fsdp else []))
    lines = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    kd = [x["kd_loss"] for x in lines if x["kind"] == "train"]
    assert len(kd) == 5 and min(kd) > 0
    np.testing.assert_allclose(losses(four), losses(one), rtol=1e-5)
    assert_same_params(final_params(four), final_params(one))


def two_processes(out: Path, *extra: str) -> None:
    """`parallel_worker.py` as 2 processes x 2 devices on loopback, writing `out`."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(None))  # the worker sets its device count
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(WORKER), "--output", str(out), "--devices", "2"),
                *("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"),
                *("--process-id", str(i), *extra),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Two processes x 2 devices, hard-distilling from a teacher placed on their mesh, train as
    one 4-device process does (losses and parameters); their checkpoint restores in one process."""
    single = tmp_path / "single"
    run_worker(single, "--devices", "4", "--steps", "3", "--distillation", "hard")
    multi = tmp_path / "multi"
    two_processes(multi, "--steps", "3", "--distillation", "hard")
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    assert_same_params(final_params(multi), final_params(single))
    lines = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert min(x["kd_loss"] for x in lines if x["kind"] == "train") > 0  # the teacher was used
    # One checkpoint, written collectively, that this single 2-device process restores.
    assert [p.name for p in (multi / "checkpoints").iterdir()] == ["3"]
    from deit import train
    from deit.checkpoint import Checkpoints, abstract_like
    from deit.model import DeiT

    model, _, _ = export.load_model(multi / "final")
    assert isinstance(model, DeiT)
    from deit.augment import ErasingConfig, MixupConfig
    from deit.optim import OptimConfig, create_optimizer

    tx, _ = create_optimizer(OptimConfig(lr=3e-3, warmup_epochs=0, epochs=1), 16, 3)
    cfg = train.StepConfig(10, (0.5,) * 3, (0.5,) * 3, MixupConfig(), ErasingConfig())
    mesh = parallel.make_mesh()
    state = train.init_state(model, tx, cfg, 0, (16, 16, 3))
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    ckpts = Checkpoints(multi / "checkpoints")
    restored, _ = ckpts.restore(abstract_like(state))
    ckpts.close()
    assert int(restored.step) == 3
    assert_same_params(jax.device_get(restored.params), final_params(single))
    from deit.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(multi / "final", "digits")
    assert result["avg"]["count"] == 360


def test_batch_must_divide_by_devices():
    mesh = parallel.make_mesh()
    with pytest.raises(
        ValueError, match=f"global batch 7 does not divide by the {mesh.devices.size} devices"
    ):
        parallel.check_batch(7, mesh)


def test_initialize_needs_all_three():
    with pytest.raises(ValueError, match="needs all three"):
        parallel.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(ValueError, match="process_id 3 is outside"):
        parallel.initialize("127.0.0.1:1234", 2, 3)
