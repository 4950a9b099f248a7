"""DeiT on an NVIDIA GPU against timm (eager and `torch.compile`), sized for a few minutes of GPU.

    python bench/gpu.py table [--dry-run]     # images/s of inference and the training step
    python bench/gpu.py compile [--dry-run]   # first compile of the training step, cold / cached
    python bench/gpu.py loop [--dry-run]      # `deit train` on synthetic input against its step

`bash bench/gpu.sh` runs the three in one go, each under its own timeout and log, and writes
`bench/results/gpu_<gpu>.{json,md}` (`--dry-run`: the same code on the CPU with a tiny model, no
torch, results under `bench/results/gpu_dry_run*`).

`table` times, interleaved in rounds (median of rounds, each case at least `min_seconds`):
DeiT-Ti/S/B distilled inference in bf16 at batch 256 and 1024 (`DeiTOutput.logits`); the
hard-distillation training step at batch 256 (`speed.train_program`: uint8 batch -> erasing,
mixup/cutmix, student, ResNet-18 teacher on the same images, AdamW, state donated); an 8192^3
bf16 matmul (the same-run peak); and the levers of `LEVERS` on DeiT-S. timm runs the same work in
worker processes (`timm_worker.py`: bf16 autocast, channels-last inference, `torch.compile` in
its default mode), which build and compile while JAX compiles. GPU work is timed by dispatching
many calls and waiting once (`timm_worker.run_async`). Also recorded: each program's compile
time (JAX's compiles run two at a time, so these are upper bounds; `compile` has the clean
figure), XLA's memory estimate per program, peak device memory per side, and the largest
|logit| difference of the GPU kernels against the einsum path and of bf16 against float32.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import faulthandler
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TI, S, B = (f"deit_{s}_distilled_patch16_224" for s in ("tiny", "small", "base"))
TINY = "deit_test_distilled_patch4_32"

# name -> (DEIT_ATTENTION, matmul outputs in float32 as on the CPU, XLA compiler options)
# "deit" is what the package does by itself; "before" what it did when GPU.md was measured.
LEVERS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "deit": ("auto", False, {}),
    "before": ("xla", True, {}),
    "xla-attention": ("xla", False, {}),
    "f32-outputs": ("auto", True, {}),
    "no-triton-gemm": ("auto", False, {"xla_gpu_enable_triton_gemm": False}),
    "autotune-0": ("auto", False, {"xla_gpu_autotune_level": 0}),
}


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...] = (TI, S, B)
    batches: tuple[int, ...] = (256, 1024)
    train_batch: int = 256
    lever_model: str = S
    infer_levers: tuple[str, ...] = ("before", "xla-attention", "f32-outputs", "no-triton-gemm")
    train_levers: tuple[str, ...] = ("before", "autotune-0")
    matmul: int = 8192
    rounds: int = 3
    min_seconds: float = 0.25
    compile_threads: int = 2
    torch_workers: int = 4
    build_deadline_s: float = 170.0  # cases not built by then are left out
    timm: bool = True
    compile_train: bool = True  # timm's training step under torch.compile too
    img_size: int = 224

    @staticmethod
    def quick() -> Plan:
        """Batch 256 only, one lever, no compiled training step: what fits 3 minutes."""
        return Plan(
            batches=(256,), infer_levers=("before",), train_levers=(), rounds=2,
            build_deadline_s=110.0, torch_workers=3, compile_train=False,
        )  # fmt: skip

    @staticmethod
    def dry() -> Plan:
        return Plan(
            models=(TINY,), batches=(4,), train_batch=4, lever_model=TINY, matmul=256,
            infer_levers=("before", "xla-attention", "f32-outputs"), train_levers=("before",),
            rounds=1, min_seconds=0.0, timm=False, img_size=32,
        )  # fmt: skip


@dataclass
class Entry:
    """A timed case of the table: `case` a `speed.Case`, `lever` its name in `LEVERS`."""

    case: Any
    lever: str = "deit"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _traced(lever: str, build: Any) -> Any:
    """`build()` (which traces) under `lever`'s attention kernel and matmul output form."""
    from deit import layers

    attention, f32_out, _ = LEVERS.get(lever, LEVERS["deit"])
    before_env, before_fn = os.environ.get("DEIT_ATTENTION"), layers.f32_outputs
    os.environ["DEIT_ATTENTION"] = attention
    if f32_out:
        layers.f32_outputs = lambda dtype: dtype is not None and str(dtype) != "float32"
    try:
        return build()
    finally:
        layers.f32_outputs = before_fn
        if before_env is None:
            os.environ.pop("DEIT_ATTENTION", None)
        else:
            os.environ["DEIT_ATTENTION"] = before_env


def _matmul_program(n: int) -> tuple[Any, Any, tuple]:
    """(case, jitted, args): `(n, n) @ (n, n)` in bf16 accumulating in float32, the same-run
    peak the models' rates are compared with."""
    import jax
    import jax.numpy as jnp
    from speed import Case

    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in (0, 1))
    fn = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    return Case("matmul", "xla", f"{n}x{n}", 1, "bfloat16", 2.0 * n**3), fn, (a, b)


def _jax_jobs(plan: Plan, log: Any) -> list[tuple[Entry, Any, tuple, Any]]:
    """Every JAX case, most wanted first, traced here (the levers switch while tracing)."""
    import speed

    start = time.monotonic()

    train = lambda out: out[0]
    jobs: list[tuple[Entry, Any, tuple, Any]] = []

    def add(lever: str, program: tuple[Any, Any, tuple], after: Any = None) -> None:
        case, fn, args = program
        lowered = _traced(lever, lambda: fn.lower(*args))
        jobs.append((Entry(case, lever), lowered, args, after))
        log(f"{case.key} [{lever}]: built and traced at {time.monotonic() - start:.0f} s")

    def options(lever: str) -> dict[str, Any] | None:
        return LEVERS[lever][2] or None

    add("xla", _matmul_program(plan.matmul))
    for name in plan.models:
        add("deit", speed.inference_program(name, plan.batches[0], "bfloat16"))
    for name in plan.models:
        add("deit", speed.train_program(name, plan.train_batch, "bfloat16"), train)
    # The loop's own step (`loop` and the input-pipeline bench compare `deit train` with it):
    # no teacher.
    for name in plan.models[:2]:
        add("no-teacher", speed.train_program(name, plan.train_batch, "bfloat16", None), train)
    for name in plan.models:
        for batch in plan.batches[1:]:
            add("deit", speed.inference_program(name, batch, "bfloat16"))
    for lever in plan.infer_levers:
        program = speed.inference_program(
            plan.lever_model, plan.batches[0], "bfloat16", options=options(lever)
        )
        add(lever, program)
    for lever in plan.train_levers:
        program = speed.train_program(
            plan.lever_model, plan.train_batch, "bfloat16", options=options(lever)
        )
        add(lever, program, train)
    return jobs


def _compile(job: tuple[Entry, Any, tuple, Any]) -> Entry:
    """Compile one job (timed) and make its entry's `case.run` time it."""
    import jax
    import speed
    from timm_worker import run_async

    entry, lowered, args, after = job
    tick = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # a kernel this GPU or cuDNN refuses: recorded, not fatal
        entry.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return entry
    entry.case.info["compile_s"] = time.perf_counter() - tick
    entry.case.info["xla_mib"] = speed._xla_mib(compiled)
    holder, last = list(args), [None]

    def call() -> int:
        out = compiled(*holder)
        last[0] = out
        if after is not None:
            holder[0] = after(out)
        return entry.case.batch

    def run(min_seconds: float) -> tuple[int, float, int]:
        result = run_async(call, lambda: jax.block_until_ready(last[0]), min_seconds, calls[0])
        calls[0] = result[2]
        return result

    calls = [1]
    entry.case.run = run
    return entry


def _jax_entries(plan: Plan, seconds: float, log: Any) -> list[Entry]:
    """`_jax_jobs` compiled `compile_threads` at a time; what is not compiled `seconds` after
    tracing is left out."""
    jobs = _jax_jobs(plan, log)
    deadline = time.monotonic() + seconds
    log(f"{len(jobs)} programs traced; compiling")
    pool = concurrent.futures.ThreadPoolExecutor(plan.compile_threads)
    futures = [pool.submit(_compile, job) for job in jobs]
    for future, job in zip(futures, jobs, strict=True):
        entry = job[0]
        try:
            future.result(timeout=max(deadline - time.monotonic(), 0.01))
        except concurrent.futures.TimeoutError:
            entry.error = "not compiled before the deadline"
        state = entry.error or f"compiled in {entry.case.info['compile_s']:.1f} s"
        log(f"{entry.case.key} [{entry.lever}]: {state}")
    pool.shutdown(wait=False, cancel_futures=True)
    return [job[0] for job in jobs]


def _timm_entries(plan: Plan) -> tuple[list[Any], list[Entry]]:
    """timm's cases, spread over `torch_workers` processes that build them meanwhile."""
    from speed import Case
    from timm_worker import TorchWorker

    # Eager cases share worker 0 (built in seconds); the compiled ones, minutes of inductor
    # work, are spread over the others (the training steps on a worker of their own).
    workers = [TorchWorker(threads=4) for _ in range(plan.torch_workers)]
    entries: list[Entry] = []
    spread, placed = {"infer": [1, 2], "train": [3]}, {"infer": 0, "train": 0}
    for compiled in (False, True):
        impl = "timm-compile" if compiled else "timm"
        for name in plan.models:
            for batch in (*plan.batches, "train"):
                kind = "train" if batch == "train" else "infer"
                b = plan.train_batch if kind == "train" else batch
                if compiled and kind == "train" and not plan.compile_train:
                    continue
                spec = {
                    "kind": kind, "model": name, "batch": b, "dtype": "bfloat16",
                    "compile": compiled, "img_size": plan.img_size, "num_classes": 1000,
                    "device": "cuda", "channels_last": True, "sync_each": False,
                    "teacher": "resnet18", "drop_path": 0.1,
                }  # fmt: skip
                entry = Entry(Case(kind, impl, name, b, "bfloat16"), impl)
                where = 0
                if compiled:
                    slots = [i % len(workers) for i in spread[kind]]
                    where = slots[placed[kind] % len(slots)]
                    placed[kind] += 1
                entry.extra = {"worker": workers[where], "spec": spec}
                entries.append(entry)
    # Eager cases first on every worker: they are ready in seconds, the compiled ones later.
    for entry in entries:
        entry.extra["worker"].send("setup", entry.case.key, entry.extra["spec"])
    return workers, entries


def _collect_timm(entries: list[Entry], deadline: float, log: Any) -> None:
    for entry in entries:
        worker = entry.extra["worker"]
        if entry.error is not None:
            continue
        left = deadline - time.monotonic()
        try:
            built = worker.receive(timeout=max(left, 0.01))
        except RuntimeError as err:
            entry.error = str(err)[:300]
            log(f"{entry.case.key}: {entry.error}")
            continue
        if built is None:  # the worker is still compiling: it and its later cases are left out
            worker.kill()
            for other in entries:
                if other.extra.get("worker") is worker and other.case.run is None:
                    other.error = other.error or "not built before the deadline"
            log(f"{entry.case.key}: not built before the deadline")
            continue
        entry.case.info.update(built)
        key = entry.case.key
        entry.case.run = lambda s, w=worker, key=key: w.call("run_gpu", key, s, timeout=120)
        log(f"{key}: built ({built['first_call_s']:.1f} s to its first call)")


def _differences(plan: Plan) -> dict[str, float]:
    """Largest |logit| difference on one batch of 32 of DeiT-S: the kernels chosen here
    against the einsum path (both bf16), and bf16 against float32."""
    import jax
    import numpy as np

    import deit

    name = plan.lever_model
    x = jax.random.normal(jax.random.PRNGKey(1), (32, plan.img_size, plan.img_size, 3))
    out = {}
    for label, dtype, attention in (
        ("deit", "bfloat16", "auto"), ("einsum", "bfloat16", "einsum"),
        ("float32", "float32", "einsum"),
    ):  # fmt: skip
        model = deit.create_model(name, dtype=dtype)
        params = deit.init_params(model, 0)
        os.environ["DEIT_ATTENTION"] = attention
        try:
            out[label] = np.asarray(jax.jit(model.apply)({"params": params}, x).logits)
        finally:
            os.environ.pop("DEIT_ATTENTION", None)
    d = lambda a, b: float(np.abs(out[a] - out[b]).max())
    return {
        "gpu_kernels_vs_einsum_bf16": d("deit", "einsum"),
        "bf16_vs_float32": d("deit", "float32"),
        "einsum_bf16_vs_float32": d("einsum", "float32"),
        "float32_logit_scale": float(np.abs(out["float32"]).max()),
    }


def _measure(entries: list[Entry], round_index: int, min_seconds: float) -> None:
    """One round over the live entries, in reverse order every other round."""
    live = [e for e in entries if e.case.run is not None and e.error is None]
    for entry in live if round_index % 2 == 0 else live[::-1]:
        try:
            images, seconds, _ = entry.case.run(min_seconds)
            entry.case.rates.append(images / seconds)
        except Exception as err:
            entry.error = f"{type(err).__name__}: {str(err)[:300]}"


def _environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib

    env: dict[str, Any] = {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "cores": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }  # fmt: skip
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        env["nvidia_smi"] = smi.stdout.strip()
    return env


def table(plan: Plan, out: Path, log: Any) -> dict[str, Any]:
    import jax

    start = time.monotonic()
    workers: list[Any] = []
    result: dict[str, Any] = {"plan": plan.__dict__, "environment": _environment()}
    entries: list[Entry] = []

    def save() -> None:  # after every phase: a stage cut short still leaves its numbers
        result["cases"] = [
            {**e.case.to_json(), "lever": e.lever, "error": e.error} for e in entries
        ]
        result["seconds"] = time.monotonic() - start
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    try:
        # JAX's programs are built before the torch workers start: on the H200 machine, with
        # torch workers compiling beside it, building them did not end within 300 s (twice).
        entries += _jax_entries(plan, plan.build_deadline_s, log)
        stats = jax.devices()[0].memory_stats() or {}
        result["jax_peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
        log(f"JAX side built in {time.monotonic() - start:.0f} s")
        save()
        workers, timm = _timm_entries(plan) if plan.timm else ([], [])
        _collect_timm(timm, time.monotonic() + plan.build_deadline_s, log)
        entries += timm
        save()
        result["differences"] = _differences(plan)
        for r in range(plan.rounds):
            _measure(entries, r, plan.min_seconds)
            log(f"round {r + 1}/{plan.rounds} done at {time.monotonic() - start:.0f} s")
            save()
        if workers:
            live = [w for w in workers if w.proc.poll() is None]
            result["torch"] = live[0].call("stats", timeout=30) if live else None
            result["torch_peak_mib"] = max(
                (w.call("peak_mib", timeout=30) for w in live), default=None
            )
    finally:
        for w in workers:
            w.close()
        save()
    return result


# ---------------------------------------------------------------------------------------------
# `compile`: the training step's first compile, each in a fresh process.

COMPILE_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
import jax
if {cache!r}:
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
import speed
tick = time.perf_counter()
case, step, args = speed.train_program({model!r}, {batch}, "bfloat16", {teacher!r})
traced = time.perf_counter()
lowered = step.lower(*args)
lowered_at = time.perf_counter()
compiled = lowered.compile()
done = time.perf_counter()
jax.block_until_ready(compiled(*args))
print(json.dumps({{"build_s": traced - tick, "trace_s": lowered_at - traced,
                  "compile_s": done - lowered_at, "first_step_s": time.perf_counter() - done}}))
"""


def compile_times(plan: Plan, out: Path, log: Any, model: str) -> dict[str, Any]:
    """Cold (own empty cache), then warm (the same cache: a second run), then cold variants."""
    cases = [
        ("cold", {}, "resnet18", "a"),
        ("warm (persistent cache)", {}, "resnet18", "a"),
        ("cold, autotune level 0", {"XLA_FLAGS": "--xla_gpu_autotune_level=0"}, "resnet18", "b"),
        ("cold, no teacher", {}, None, "c"),
    ]
    result: dict[str, Any] = {"model": model, "batch": plan.train_batch, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, env, teacher, cache in cases:
            code = COMPILE_CHILD.format(
                bench=str(HERE), cache=f"{tmp}/{cache}", model=model,
                batch=plan.train_batch, teacher=teacher,
            )  # fmt: skip
            tick = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", code], env={**os.environ, **env},
                capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            row: dict[str, Any] = {"case": label, "process_s": time.perf_counter() - tick}
            try:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                row["error"] = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            result["cases"].append(row)
            log(json.dumps(row))
            out.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# `loop`: `deit train` on synthetic input, twice (the second start finds the compile cache).

_RATE = re.compile(r"step (\d+)/\d+ .* (\d+) img/s")
_TIMED = re.compile(r"([0-9.e+-]+) s/step over (\d+) step")


def loop(plan: Plan, out: Path, log: Any, model: str, images: int) -> dict[str, Any]:
    result: dict[str, Any] = {"model": model, "batch": plan.train_batch, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold cache", "warm cache"):
            argv = [
                sys.executable, "-m", "deit.cli", "train", "--data", f"synthetic:{images}",
                "--model", model, "--img-size", str(plan.img_size),
                "--batch-size", str(plan.train_batch), "--epochs", "1", "--distillation", "none",
                "--no-model-ema", "--log-every", "20", "--progress", "lines",
                "--output", f"{tmp}/{label.split()[0]}",
            ]  # fmt: skip
            env = {**os.environ, "DEIT_HOME": f"{tmp}/home"}
            tick = time.perf_counter()
            proc = subprocess.Popen(
                argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            first_step, rates, lines = None, [], []
            for line in proc.stderr:
                lines.append(line.rstrip())
                # "<per step> s/step over <n> step(s) after the first": the first step ended
                # n steps of per_step before this line.
                if first_step is None and (m := _TIMED.search(line)):
                    first_step = time.perf_counter() - tick - float(m[1]) * int(m[2])
                if (m := _RATE.search(line)) and int(m[1]) > 20:  # the first window has step 1
                    rates.append(int(m[2]))
            proc.wait(timeout=60)
            row = {
                "run": label, "launch_to_first_step_s": first_step, "loop_img_per_s": rates,
                "process_s": time.perf_counter() - tick, "exit": proc.returncode,
                "header": [ln for ln in lines if "precision" in ln or "devices" in ln],
            }  # fmt: skip
            if proc.returncode:
                row["tail"] = lines[-5:]
            result["runs"].append(row)
            log(json.dumps(row))
            out.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# The report: the three results as one JSON and one markdown page.

SHORT = {TI: "DeiT-Ti⚗", S: "DeiT-S⚗", B: "DeiT-B⚗", TINY: "test"}


def _fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def report(found: dict[str, Any]) -> str:
    """Markdown of `found` ({"table": ..., "compile": ..., "loop": ...}, any may be missing)."""
    lines: list[str] = []
    table = found.get("table") or {}
    cases = table.get("cases", [])
    env = table.get("environment", {})
    if env:
        torch = table.get("torch") or {}
        lines += [
            f"{env.get('nvidia_smi') or env.get('device')}; jax {env.get('jax')}, flax "
            f"{env.get('flax')}, torch {torch.get('torch', '—')}, timm {torch.get('timm', '—')}; "
            f"bf16, median of {table['plan']['rounds']} interleaved rounds.",
            "",
        ]
    peak = next((c for c in cases if c["kind"] == "matmul"), None)
    peak_flops = peak["gflops_per_s"] if peak else None
    if peak_flops:
        lines += [f"Same-run bf16 {peak['model']} matmul: {peak_flops / 1e3:,.0f} TFLOP/s.", ""]
    get = lambda kind, model, batch, impl, lever: next(
        (
            c
            for c in cases
            if (c["kind"], c["model"], c["batch"], c["impl"], c["lever"])
            == (kind, model, batch, impl, lever)
        ),
        None,
    )
    rate = lambda c: None if c is None else c["images_per_s"]
    if not cases:
        lines += [f"{found.get('gpu', 'GPU')}: the table was not measured in this run.", ""]
    lines += [
        "| case | deit | timm eager | timm compile | deit ÷ eager | deit ÷ compile "
        "| deit % of matmul | deit compile s | deit XLA MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines = lines if cases else lines[:2]
    rows = sorted(
        {(c["kind"], c["model"], c["batch"]) for c in cases if c["kind"] != "matmul"},
        key=lambda r: (r[0] != "infer", r[2], list(SHORT).index(r[1]) if r[1] in SHORT else 9),
    )
    for kind, model, batch in rows:
        d = get(kind, model, batch, "deit", "deit")
        e, c = get(kind, model, batch, "timm", "timm"), get(kind, model, batch, "timm-compile",
                                                            "timm-compile")  # fmt: skip
        dr, er, cr = rate(d), rate(e), rate(c)
        ratio = lambda a, b: None if not a or not b else a / b
        share = None
        if d and dr and peak_flops:
            share = 100 * dr * d["flops"] / 1e9 / peak_flops
        name = (
            f"{'inference' if kind == 'infer' else 'train step'} {SHORT.get(model, model)} b{batch}"
        )
        lines.append(
            f"| {name} | {_fmt(dr)} | {_fmt(er)} | {_fmt(cr)} | {_fmt(ratio(dr, er), 2)}× "
            f"| {_fmt(ratio(dr, cr), 2)}× | {_fmt(share, 1)}% "
            f"| {_fmt((d or {}).get('info', {}).get('compile_s'), 1)} "
            f"| {_fmt((d or {}).get('info', {}).get('xla_mib'))} |"
        )
    levers = [c for c in cases if c["impl"] == "deit" and c["lever"] != "deit"]
    if levers:
        lines += ["", "Levers (deit alone, img/s; ÷ deit: against the package's own choice):"]
        lines += ["", "| case | lever | img/s | ÷ deit | compile s |", "|---|---|---|---|---|"]
        for c in levers:
            base = rate(get(c["kind"], c["model"], c["batch"], "deit", "deit"))
            r = rate(c)
            lines.append(
                f"| {c['kind']} {SHORT.get(c['model'], c['model'])} b{c['batch']} | {c['lever']} "
                f"| {_fmt(r)} | {_fmt(None if not r or not base else r / base, 2)}× "
                f"| {_fmt(c['info'].get('compile_s'), 1)} |"
            )
    errors = [c for c in cases if c.get("error")]
    if errors:
        lines += ["", "Not measured:", ""]
        lines += [f"- {c['kind']}/{c['impl']}/{c['model']}/b{c['batch']} [{c['lever']}]: "
                  f"{c['error']}" for c in errors]  # fmt: skip
    if "differences" in table:
        lines += ["", "Largest |Δ logit| (DeiT-S⚗, 32 images): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in table["differences"].items())]  # fmt: skip
    if table.get("jax_peak_mib") or table.get("torch_peak_mib"):
        jax_mib, torch_mib = _fmt(table.get("jax_peak_mib")), _fmt(table.get("torch_peak_mib"))
        lines += ["", f"Peak device memory: JAX {jax_mib} MiB (all its cases held at once), "
                  f"torch {torch_mib} MiB (the largest worker)."]  # fmt: skip
    comp = found.get("compile")
    if comp:
        lines += ["", f"First compile of the training step ({SHORT.get(comp['model'])}, "
                  f"b{comp['batch']}, bf16, ResNet-18 teacher), each in a fresh process:", "",
                  "| case | trace s | compile s | process s |", "|---|---|---|---|"]  # fmt: skip
        for row in comp["cases"]:
            lines.append(
                f"| {row['case']} | {_fmt(row.get('trace_s'), 1)} "
                f"| {_fmt(row.get('compile_s'), 1)} | {_fmt(row.get('process_s'), 1)} |"
                + (f" {row['error']}" if "error" in row else "")
            )
    lp = found.get("loop")
    if lp:
        bare = get("train", lp["model"], lp["batch"], "deit", "no-teacher")
        lines += ["", f"`deit train --data synthetic` ({SHORT.get(lp['model'])}, b{lp['batch']}, "
                  f"no teacher, no EMA) against its bare step ({_fmt(rate(bare))} img/s):", "",
                  "| run | launch to first step s | loop img/s | ÷ bare step |",
                  "|---|---|---|---|"]  # fmt: skip
        for run in lp["runs"]:
            loop_rate = max(run["loop_img_per_s"], default=None)
            ratio = None if not loop_rate or not rate(bare) else loop_rate / rate(bare)
            lines.append(
                f"| {run['run']} | {_fmt(run['launch_to_first_step_s'], 1)} "
                f"| {', '.join(map(str, run['loop_img_per_s'])) or '—'} | {_fmt(ratio, 2)}× |"
            )
    return "\n".join(lines) + "\n"


def collect(folder: Path, name: str) -> Path:
    """`folder`'s table/compile/loop JSON as `RESULTS/<name>.json` and `.md`."""
    found: dict[str, Any] = {}
    csv = folder / "gpu.csv"  # nvidia-smi's name, driver, memory (header line first)
    if csv.exists() and len(csv.read_text().splitlines()) > 1:
        found["gpu"] = csv.read_text().splitlines()[1].strip()
    for what in ("table", "compile", "loop"):
        path = folder / f"{what}.json"
        if path.exists():
            found[what] = json.loads(path.read_text())
    (RESULTS / f"{name}.json").write_text(json.dumps(found, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report(found))
    return RESULTS / f"{name}.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("table", "compile", "loop", "report"))
    parser.add_argument("--dir", default=None, help="report: the folder of the three JSON")
    parser.add_argument("--name", default=None, help="report: results name (gpu_<gpu>)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no torch")
    parser.add_argument("--quick", action="store_true", help="batch 256 only, fewer cases")
    parser.add_argument("--out", default=None, help="JSON file (default: under bench/results)")
    args = parser.parse_args(argv)
    plan = Plan.dry() if args.dry_run else Plan.quick() if args.quick else Plan()
    name = f"gpu_dry_run_{args.what}" if args.dry_run else f"gpu_{args.what}"
    out = Path(args.out or RESULTS / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(f"[{args.what}] {text}", flush=True)
    if args.what == "report":
        print(collect(Path(args.dir), args.name).read_text())
        return
    # A stage stopped by gpu.sh's timeout still says where its time went.
    faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)
    if args.what == "table":
        table(plan, out, log)
    elif args.what == "compile":
        compile_times(plan, out, log, TINY if args.dry_run else B)
    else:
        loop(plan, out, log, TINY if args.dry_run else S, 256 if args.dry_run else 25_600)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
