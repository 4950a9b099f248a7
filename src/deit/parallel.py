"""Devices and processes: one mesh over every device of every process, the batch sharded on `data`.

Parameters and optimizer state are replicated (data parallelism, as the paper's 8-16 GPU runs) or,
with `fsdp=True`, each large array is split along its first divisible axis over the same `data`
axis (ZeRO-3 style); XLA inserts the gathers. Multi-host runs go through JAX's own runtime
(`jax.distributed.initialize`), with explicit coordinator flags, environment variables, or the
cluster auto-detection JAX ships (SLURM, Open MPI, TPU pods, ...).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deit import data as data_lib
from deit.errors import InputError

AXIS = "data"


@dataclass(frozen=True)
class ParallelConfig:
    """How the state is laid out over the devices (the processes are given at launch)."""

    fsdp: bool = False
    """Shard parameters and optimiser state over the devices instead of replicating them."""
    heartbeat_timeout: int = 60
    """Seconds without a heartbeat after which a process of a multi-process run counts as lost:
    the others then stop with one line naming it (JAX's own runtime gets 30 s more, so that
    this line comes before its abort)."""
    shutdown_timeout: int = 300
    """Seconds a finished process of a multi-process run waits for the others at exit."""
    init_timeout: int = 300
    """Seconds the processes of a multi-process run wait for each other at start-up."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout", "shutdown_timeout", "init_timeout"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} {getattr(self, name)}; expected 1 or more seconds")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeouts: ParallelConfig | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> None:
    """Join a multi-process run before any other JAX call, when there is one to join.

    Explicit arguments win; otherwise `DEIT_COORDINATOR`, `DEIT_NUM_PROCESSES`, `DEIT_PROCESS_ID`;
    otherwise JAX's auto-detection when a cluster environment (SLURM, ...) is present. With
    several processes a `Watchdog` then watches the others (`timeouts.heartbeat_timeout`); when
    one is lost it calls `on_lost(message)` and ends this process (`LOST_EXIT`).
    """
    timeouts = timeouts or ParallelConfig()
    coordinator = coordinator or os.environ.get("DEIT_COORDINATOR")
    if num_processes is None and "DEIT_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DEIT_NUM_PROCESSES"])
    if process_id is None and "DEIT_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DEIT_PROCESS_ID"])
    runtime = {
        "initialization_timeout": timeouts.init_timeout,
        # JAX aborts every process (a C++ stack dump) when its heartbeats fail: later than the
        # watchdog, which names the lost process first.
        "heartbeat_timeout_seconds": timeouts.heartbeat_timeout + 30,
        "shutdown_timeout_seconds": timeouts.shutdown_timeout,
    }
    if coordinator or num_processes or process_id is not None:
        if not (coordinator and num_processes and process_id is not None):
            raise InputError(
                f"coordinator {coordinator!r}, num_processes {num_processes}, process_id "
                f"{process_id}: a multi-process run needs all three"
            )
        if not 0 <= process_id < num_processes:
            raise InputError(f"process_id {process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id, **runtime)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(**runtime)
    else:
        return
    global _watchdog
    _watchdog = Watchdog(timeouts.heartbeat_timeout, on_lost)
    _watchdog.start()


LOST_EXIT = 4  # the exit status of a process that stops because another one was lost
_watchdog: Watchdog | None = None


class Watchdog(threading.Thread):
    """Each process's heartbeat in JAX's key-value store, and the others' watched: a process
    whose count stops for `timeout` s is lost. Then this process cannot go on (its next
    collective fails or hangs, Orbax's barriers time out), so it says which one was lost and
    exits at once, from this thread, whatever the main thread is stuck in.

    A process that lost the coordinator (process 0, which holds the store) is ended by JAX
    itself, at once: its runtime aborts when it loses its link to the coordinator."""

    def __init__(self, timeout: float, on_lost: Callable[[str], None] | None) -> None:
        super().__init__(name="deit-watchdog", daemon=True)
        from jax._src import distributed  # the runtime's client: no public handle in jax 0.10

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout = timeout
        self.interval = min(max(timeout / 10, 0.2), 5.0)
        self.on_lost = on_lost
        self.done = threading.Event()

    def run(self) -> None:
        beat = 0
        now = time.monotonic()
        seen = {j: ("", now) for j in range(self.count) if j != self.me}
        failing_since = None
        while not self.done.wait(self.interval):
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"deit/alive/{self.me}", str(beat), allow_overwrite=True)
                beats = dict(self.client.key_value_dir_get("deit/alive/"))
                failing_since = None
            except Exception:  # the store is unreachable: the coordinator is lost
                failing_since = failing_since or now
                if now - failing_since > self.timeout:
                    self._lost([0])
                continue
            for j, (value, _) in seen.items():
                current = beats.get(f"deit/alive/{j}", beats.get(str(j), ""))
                if current == "done":
                    seen[j] = ("done", float("inf"))
                elif current != value:
                    seen[j] = (current, now)
            lost = [j for j, (_, since) in seen.items() if now - since > self.timeout]
            if lost:
                self._lost(lost)

    def _lost(self, lost: list[int]) -> None:
        which = ", ".join(map(str, lost))
        message = (
            f"process {which} of the {self.count} processes was lost (no sign of life for "
            f"{self.timeout:g} s); process {self.me} stops too, the checkpoints written so far "
            "are kept"
        )
        if self.on_lost is not None:
            self.on_lost(message)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(LOST_EXIT)

    def finish(self) -> None:
        """This process is done: the others stop watching it; it stops watching them."""
        self.done.set()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"deit/alive/{self.me}", "done", allow_overwrite=True)


def finish() -> None:
    """Mark this process as done (it may now exit before the others)."""
    if _watchdog is not None:
        _watchdog.finish()


def await_verdict() -> None:
    """After an error in a multi-process run: give the watchdog the time to find a lost
    process, the likely cause (it then ends this process); returns when it finds none."""
    if _watchdog is not None and _watchdog.is_alive():
        _watchdog.done.wait(_watchdog.timeout + 3 * _watchdog.interval)


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, process-major (each process's devices
    are contiguous, so a process's share of the batch is contiguous too)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fitting_batch(images: int, mesh: Mesh) -> int:
    """The largest power of two (else multiple of the device count) at most `images` that
    divides over every device and process: the batch to suggest for a small data set."""
    n = math.lcm(mesh.devices.size, jax.process_count())
    power = 1 << max(images.bit_length() - 1, 0)
    while power >= n and power % n:
        power //= 2
    return power if power >= n and power % n == 0 else max(images // n, 1) * n


def check_batch(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        raise InputError(
            f"global batch {global_batch} does not divide by the {n} devices; expected a "
            f"multiple of {n}"
        )
    if global_batch % jax.process_count():
        raise InputError(
            f"global batch {global_batch} does not divide by the {jax.process_count()} processes"
        )


def _fsdp_spec(x: Any, n: int, min_size: int) -> PartitionSpec:
    shape = getattr(x, "shape", ())
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False, min_size: int = 2**14) -> Any:
    """Shardings for a pytree of arrays: replicated, or FSDP-split along the largest axis that
    divides by the device count (small arrays stay replicated: splitting them costs more than
    it saves)."""
    if not fsdp:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), state)
    n = mesh.devices.size
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _fsdp_spec(x, n, min_size)), state)


def put_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of the global batch -> global arrays sharded along `data`. Parts
    already on a device (the GPU input path's images) are resharded there, not via the host."""
    sharding = data_sharding(mesh)
    return {k: _put(v, sharding) for k, v in batch.items()}


def _put(local: Any, sharding: NamedSharding) -> jax.Array:
    if not isinstance(local, jax.Array):
        return jax.make_array_from_process_local_data(sharding, np.asarray(local))
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    # process-major mesh: this process's rows start at process_index * local rows
    rows = local.shape[0]
    shape = (rows * jax.process_count(), *local.shape[1:])
    first = jax.process_index() * rows
    parts = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        lo, hi, _ = index[0].indices(shape[0])
        parts.append(jax.device_put(local[lo - first : hi - first], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, parts)


def process_counts(n: int) -> np.ndarray:
    """Every process's `n`, `(process_count,)` (a collective: all processes must call it)."""
    return np.asarray(multihost_utils.process_allgather(np.int32(n)))


def take_bad(batch: dict[str, Any], source: data_lib.RecordSource, mode: str) -> tuple[list, int]:
    """`data.agreed_bad` with the processes of this run agreeing (`process_counts`):
    `(this share's bad records, all shares' count)`."""
    agree = process_counts if jax.process_count() > 1 else None
    return data_lib.agreed_bad(batch, source, mode, agree)
