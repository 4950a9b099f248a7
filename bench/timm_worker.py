"""The reference side of `bench/speed.py`: timm on torch, timed in a worker process.

The worker runs this file as a plain script (`python -P timm_worker.py ...`), so it imports neither
JAX nor the `deit` package: its peak RSS is torch's alone, and its OpenMP threads sleep while the
JAX side is timed (and XLA's sleep while this side is). The parent drives it one message at a time,
which is what interleaves the two implementations A B A B in one run.

Messages are pickled tuples over two pipes: `("setup", key, spec)`, `("run", key, min_seconds)`,
`("stats",)` and `("close",)`; replies are `("ok", value)` or `("error", message)`. A `spec` is a
dict: `kind` ("infer" or "train"), `model` (a timm name), `batch`, `dtype` ("float32" or
"bfloat16", the latter through `torch.autocast`), `compile` (wrap the model in `torch.compile`),
`img_size`, `num_classes` and, for training, `teacher` ("resnet18": torchvision's) and `drop_path`.

The training step is the official DeiT step (`main.py` / `engine.py` / `losses.py`): normalise,
random erasing (timm's `RandomErasing`, p 0.25, pixel mode), mixup / cutmix with label smoothing
(timm's `Mixup`), the teacher under `no_grad`, hard distillation
`0.5 * CE(cls, mixed targets) + 0.5 * CE(dist, teacher argmax)`, AdamW (no decay on 1-D
parameters and tokens), lr 5e-4 × batch / 512.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKER = Path(__file__)


def run_for(call: Callable[[], int], min_seconds: float, warmup: int = 1) -> tuple[int, float, int]:
    """Calls `call` (which returns the images it processed) until `min_seconds` have passed.

    The first `warmup` calls are not timed: after another case ran, the first call pays for
    caches and the allocator's pages (one call of the training step measured up to 30 % slower),
    which back-to-back steps of a real loop do not. Returns `(images, seconds, calls)` of the
    timed calls; at least one is made.
    """
    for _ in range(warmup):
        call()
    images, calls, start = 0, 0, time.perf_counter()
    while True:
        images += call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images, elapsed, calls


def run_async(
    call: Callable[[], int], sync: Callable[[], Any], min_seconds: float, n: int = 1
) -> tuple[int, float, int]:
    """Like `run_for`, for a device that queues work: `n` calls are dispatched back to back and
    waited for once (`sync`), `n` growing until they take `min_seconds` (start from the `calls`
    a previous round returned); one untimed call first. Returns `(images, seconds, calls)` of
    the last, long enough, batch of calls."""
    call()
    sync()
    while True:
        images, start = 0, time.perf_counter()
        for _ in range(n):
            images += call()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images, elapsed, n
        n = max(2 * n, int(n * 1.2 * min_seconds / max(elapsed, 1e-6)))


def max_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_NO_REPLY = object()  # what `TorchWorker._reply` returns when the timeout passes first


class TorchWorker:
    """A worker process holding timm models; `call` sends one message and waits for the reply."""

    def __init__(self, threads: int) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # -P: the script's folder (bench/, with module names like `data`) is not put on
        # sys.path, so nothing in it can shadow what torch imports.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(WORKER), str(to_child_r), str(from_child_w), str(threads)],
            pass_fds=(to_child_r, from_child_w),
            stdout=sys.stderr,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._w = os.fdopen(self._to_child, "wb")
        self._r = os.fdopen(self._from_child, "rb")

    def call(self, *message: Any, timeout: float | None = None) -> Any:
        """Send `message`, return the worker's value; RuntimeError on its error, TimeoutError
        (after killing the worker) when no reply arrives within `timeout` seconds."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the torch worker exited with code {self.proc.returncode}")
        self.send(*message)
        value = self._reply(timeout)
        if value is _NO_REPLY:
            self.kill()
            raise TimeoutError(f"no reply to {message[0]!r} within {timeout:.0f} s")
        return value

    def send(self, *message: Any) -> None:
        """Send `message` without waiting; its reply is read later with `receive`, in order."""
        pickle.dump(message, self._w)
        self._w.flush()

    def receive(self, timeout: float | None = None) -> Any:
        """The next reply (`send`'s, in order): its value, RuntimeError on its error, None
        when none came within `timeout` seconds (the worker keeps working)."""
        value = self._reply(timeout)
        return None if value is _NO_REPLY else value

    def _reply(self, timeout: float | None) -> Any:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return _NO_REPLY
        try:
            status, value = pickle.load(self._r)
        except EOFError as err:
            raise RuntimeError(f"the torch worker died (exit code {self.proc.wait()})") from err
        if status == "error":
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, TimeoutError, BrokenPipeError):
                self.call("close", timeout=30)
        self.kill()
        self._w.close()
        self._r.close()


# ---------------------------------------------------------------------------------------------
# Worker side: only this half imports torch.


def _autocast(dtype: str, device: str) -> Any:
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _synchronize(device: str) -> None:
    """A GPU call returns before its kernels finish: time them to the end, like JAX's
    `block_until_ready` on the other side."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _inference(spec: dict[str, Any]) -> Callable[[], int]:
    import timm
    import torch

    device = spec.get("device", "cpu")
    model = timm.create_model(spec["model"], num_classes=spec["num_classes"]).eval().to(device)
    b, s = spec["batch"], spec["img_size"]
    x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    if spec.get("channels_last"):  # timm's `--channels-last`, as its benchmark.py runs on GPUs
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if spec["compile"]:
        model = torch.compile(model)
    sync = spec.get("sync_each", True)

    def call() -> int:
        with torch.inference_mode(), _autocast(spec["dtype"], device):
            model(x)
        if sync:
            _synchronize(device)
        return b

    return call


def _train(spec: dict[str, Any]) -> Callable[[], int]:
    import timm
    import torch
    import torch.nn.functional as F
    import torchvision
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_weight_decay

    if spec["teacher"] != "resnet18":
        raise ValueError(f"teacher {spec['teacher']!r}; the reference knows only 'resnet18'")
    b, s, k = spec["batch"], spec["img_size"], spec["num_classes"]
    device = spec.get("device", "cpu")
    gen = torch.Generator().manual_seed(0)
    student = timm.create_model(spec["model"], num_classes=k, drop_path_rate=spec["drop_path"])
    student.train().to(device)
    student.set_distilled_training(True)
    teacher = torchvision.models.resnet18(num_classes=k).eval().to(device)
    teacher.requires_grad_(False)
    groups = param_groups_weight_decay(student, 0.05, student.no_weight_decay())
    opt = torch.optim.AdamW(groups, lr=5e-4 * b / 512, betas=(0.9, 0.999), eps=1e-8)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=k)
    erasing = RandomErasing(0.25, mode="pixel", device=device)
    criterion = SoftTargetCrossEntropy()
    forward = torch.compile(student) if spec["compile"] else student
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, k, (b,), generator=gen).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def call() -> int:
        x = (images.float() / 255 - mean) / std
        x, targets = mixup(erasing(x), labels)
        with _autocast(spec["dtype"], device):
            with torch.no_grad():
                hard = teacher(x).argmax(dim=1)
            cls, dist = forward(x)
            loss = 0.5 * criterion(cls, targets) + 0.5 * F.cross_entropy(dist, hard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if spec.get("sync_each", True):
            _synchronize(device)
        return b

    return call


def _serve(read_fd: int, write_fd: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    cases: dict[str, Callable[[], int]] = {}
    calls: dict[str, int] = {}  # per case, the calls its last GPU run needed
    devices: dict[str, str] = {}
    r, w = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    while True:
        try:
            message = pickle.load(r)
        except EOFError:
            return
        op = message[0]
        try:
            if op == "setup":
                _, key, spec = message
                tick = time.perf_counter()
                call = (_train if spec["kind"] == "train" else _inference)(spec)
                built = time.perf_counter()
                call()
                first = time.perf_counter() - built
                cases[key] = call
                devices[key] = spec.get("device", "cpu")
                value: Any = {"build_s": built - tick, "first_call_s": first}
            elif op == "run":
                _, key, min_seconds = message
                value = run_for(cases[key], min_seconds)
            elif op == "run_gpu":
                _, key, min_seconds = message
                device = devices.get(key, "cpu")
                value = run_async(
                    cases[key], lambda d=device: _synchronize(d), min_seconds, calls.get(key, 1)
                )
                calls[key] = value[2]
            elif op == "peak_mib":
                value = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            elif op == "stats":
                import timm

                value = {
                    "max_rss_mb": max_rss_mb(),
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                    "threads": torch.get_num_threads(),
                }
            elif op == "close":
                pickle.dump(("ok", None), w)
                w.flush()
                return
            else:
                raise ValueError(f"unknown message {op!r}")
            reply: tuple[str, Any] = ("ok", value)
        except Exception as err:  # reported to the parent, which records it in the table
            reply = ("error", f"{type(err).__name__}: {err}")
        pickle.dump(reply, w)
        w.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
