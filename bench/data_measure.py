"""The input-pipeline benchmark's two measurements (run by `bench/data.py`): start-up per size
and worker count, and steady-state images/s per pipeline and worker count, each case in a fresh
interpreter (`data_cases.run_case`), interleaved over rounds, summarised by medians."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from data_cases import (
    AFTER_PIPELINE,
    AFTER_SRC,
    BEFORE_PIPELINE,
    BEFORE_PIPELINE_LISTED,
    SCAN,
    TIMM_PIPELINE,
    exception_line,
    run_case,
)


def pack_shards(folder: Path, out: Path, timeout: float) -> dict[str, Any]:
    """`deit data pack folder --out out`, once: a record beside the shards says it finished."""
    record = out.with_name(out.name + ".packed.json")
    if record.exists() and out.exists():
        return json.loads(record.read_text())
    shutil.rmtree(out, ignore_errors=True)
    deit = Path(sys.executable).with_name("deit")
    cmd = [str(deit), "data", "pack", str(folder), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(AFTER_SRC)}
    print(f"packing {folder} -> {out}", file=sys.stderr, flush=True)
    tick = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - tick
    if proc.returncode != 0:
        return {
            "error": exception_line(proc.stderr, proc.returncode),
            "stderr": proc.stderr[-4000:],
        }
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"seconds": seconds, "bytes": size, "files": sum(1 for _ in out.rglob("*"))}
    record.write_text(json.dumps(result))
    return result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure_startup(args: argparse.Namespace, folders: dict, before_src: Path | None) -> dict:
    """Scan / before start, resume / after start, resume per size and worker count, interleaved."""
    raw: list[dict[str, Any]] = []
    plan: dict[str, dict[str, Any]] = {}  # per size and worker count: how "before" is run
    per_file: list[tuple[float, float]] = []  # "before" runs so far: (fixed s, s per file)
    scratch = args.out / "deit_home"
    scratch.mkdir(parents=True, exist_ok=True)

    def run(case: dict, kind: str, body: str, src: Path | None, home: Path | None = None) -> dict:
        print(
            f"  start-up {case['size']} w{case['workers']} r{case['round']}: {kind}",
            file=sys.stderr,
            flush=True,
        )
        params = {
            "dataset": case["root"],
            "workers": case["workers"],
            "batch": args.batch,
            "img_size": args.img_size,
        }
        r = run_case(body, params, src=src, cwd=args.out, timeout=args.timeout, deit_home=home)
        r.update({k: v for k, v in case.items() if k != "root"}, kind=kind)
        raw.append(r)
        if "error" in r:
            print(f"    error: {r['error']}", file=sys.stderr, flush=True)
        return r

    for rnd in range(args.rounds):
        for key, folder in folders.items():
            for workers in args.startup_workers:
                case = {"size": key, "root": folder["root"], "files": folder["files"]}
                case.update(workers=workers, round=rnd)
                run(case, "scan", SCAN, None)
                if before_src is not None:
                    mode = plan.setdefault(
                        f"{key}/{workers}", _before_mode(args, folder["files"], per_file)
                    )
                    kinds = {"full": ("start", "resume"), "single": ("start",)}
                    todo = kinds.get(mode["mode"], ()) if mode["mode"] == "full" or rnd == 0 else ()
                    for kind in todo:
                        r = run(case, f"before {kind}", BEFORE_PIPELINE, before_src)
                        if "error" not in r:
                            m = r["marks"]
                            decode = m["load_sources"] - m["import"]
                            fixed = m["first_batch"] - decode
                            per_file.append((fixed, decode / folder["files"]))
                if not args.skip_after:
                    home = Path(tempfile.mkdtemp(prefix=f"{key}-w{workers}-r{rnd}-", dir=scratch))
                    run(case, "after start", AFTER_PIPELINE, AFTER_SRC, home)
                    run(case, "after resume", AFTER_PIPELINE, AFTER_SRC, home)
                    shutil.rmtree(home, ignore_errors=True)
    return {"raw": raw, "before_plan": plan, "summary": _startup_summary(raw, plan, folders)}


def _before_mode(args: argparse.Namespace, files: int, per_file: list) -> dict[str, Any]:
    """How to run "before" at `files` files, from the rate of the runs so far."""
    if not per_file:
        return {"mode": "full"}
    fixed = statistics.median(p[0] for p in per_file)
    estimate = fixed + statistics.median(p[1] for p in per_file) * files
    if 2 * args.rounds * estimate <= args.before_budget:
        return {"mode": "full", "estimate_s": estimate}
    if estimate <= args.before_budget:
        return {"mode": "single", "estimate_s": estimate}
    return {"mode": "estimated", "estimate_s": estimate}


def _startup_summary(raw: list[dict], plan: dict, folders: dict) -> list[dict[str, Any]]:
    rows = []
    workers_seen = sorted({r["workers"] for r in raw})
    for key, folder in folders.items():
        for workers in workers_seen:
            row: dict[str, Any] = {"size": key, "files": folder["files"], "workers": workers}
            mine = [r for r in raw if r["size"] == key and r["workers"] == workers]
            for kind, mark in (
                ("scan", "scan"),
                ("before start", "first_batch"),
                ("before resume", "first_batch"),
                ("after start", "first_batch"),
                ("after resume", "first_batch"),
            ):
                ok = [r["marks"][mark] for r in mine if r["kind"] == kind and "error" not in r]
                row[kind] = median(ok)
                errors = [r["error"] for r in mine if r["kind"] == kind and "error" in r]
                if errors:
                    row[f"{kind} error"] = errors[0]
            for kind in ("after start", "after resume"):
                imports = [
                    r["marks"]["import"]
                    for r in mine
                    if r["kind"] == kind and "error" not in r and "import" in r["marks"]
                ]
                row[f"{kind} import"] = median(imports)
            mode = plan.get(f"{key}/{workers}", {"mode": "skipped"})
            row["before mode"] = mode["mode"]
            if mode["mode"] == "single":
                row["before resume"] = row["before start"]
            elif mode["mode"] == "estimated":
                row["before start"] = row["before resume"] = mode["estimate_s"]
            rows.append(row)
    return rows


def measure_throughput(args: argparse.Namespace, folder: dict, before_src: Path | None) -> dict:
    """Steady-state images/s of each pipeline at each worker count, interleaved over rounds."""
    pipelines: dict[str, tuple[str, Path | None, str]] = {}
    pack: dict[str, Any] | None = None
    if before_src is not None:
        pipelines["before (folder)"] = (BEFORE_PIPELINE_LISTED, before_src, folder["root"])
    if not args.skip_after:
        pipelines["ours (folder)"] = (AFTER_PIPELINE, AFTER_SRC, folder["root"])
        if not args.skip_shards:
            shards = args.out / f"shards_{Path(folder['root']).name}"
            pack = pack_shards(Path(folder["root"]), shards, args.timeout)
            if "error" in pack:
                print(f"  pack error: {pack['error']}", file=sys.stderr, flush=True)
            else:
                pipelines["ours (ArrayRecord)"] = (AFTER_PIPELINE, AFTER_SRC, str(shards))
    if not args.skip_timm:
        pipelines["timm"] = (TIMM_PIPELINE, None, folder["root"])
    # A fresh index cache: the first "ours (folder)" run builds it (in its first-batch time).
    (args.out / "deit_home").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="throughput-", dir=args.out / "deit_home"))
    raw = []
    for rnd in range(args.rounds):
        for workers in args.workers:
            for name, (body, src, dataset) in pipelines.items():
                print(f"  throughput {name} w{workers} r{rnd}", file=sys.stderr, flush=True)
                params = {
                    "dataset": dataset,
                    "workers": workers,
                    "batch": args.batch,
                    "img_size": args.img_size,
                    "batches": args.batches,
                    "warmup": args.warmup,
                }
                r = run_case(
                    body, params, src=src, cwd=args.out, timeout=args.timeout, deit_home=home
                )
                r.update(pipeline=name, workers=workers, round=rnd)
                if "error" not in r and r["steps"] < args.batches:
                    r["note"] = f"only {r['steps']} timed batches: the epoch ended"
                if "error" in r:
                    print(f"    error: {r['error']}", file=sys.stderr, flush=True)
                raw.append(r)
    shutil.rmtree(home, ignore_errors=True)
    return {"pack": pack, "raw": raw, "summary": _throughput_summary(raw, list(pipelines), args)}


# Rated from the iterator's creation to the end of the window, not over the window: the old
# pipeline's grain reads ahead with 16 threads into a 500-batch buffer whatever the worker count,
# so any window after the first batch partly times a buffer.
FROM_START = ("before (folder)",)


def _throughput_summary(raw: list[dict], names: list[str], args: argparse.Namespace) -> list:
    rows = []
    for name in names:
        for workers in args.workers:
            mine = [r for r in raw if r["pipeline"] == name and r["workers"] == workers]
            ok = [r for r in mine if "error" not in r]
            key = "from_start_images_per_s" if name in FROM_START else "images_per_s"
            rate = median([r[key] for r in ok])
            late = median([r["late_images_per_s"] for r in ok if r.get("late_images_per_s")])
            if name in FROM_START:
                late = None
            row = {
                "pipeline": name,
                "workers": workers,
                "runs": len(ok),
                "first_batch_s": median([r["marks"]["first_batch"] for r in ok]),
                "images_per_s": rate,
                "late_images_per_s": late,
                "rate": key,
                "busy_cores": median(
                    [r["window_busy_cores"] for r in ok if "window_busy_cores" in r]
                ),
                "buffered": bool(rate and late and rate > 1.15 * late),
                "batch": ok[0].get("batch") if ok else None,
            }
            if ok and "torch_threads" in ok[0]:
                row["torch_threads"] = ok[0]["torch_threads"]
            errors = [r["error"] for r in mine if "error" in r]
            if errors:
                row["error"] = errors[0]
            rows.append(row)
    # Ratios use the second half's rate where a draining buffer inflated the whole window's.
    fair = {
        (r["pipeline"], r["workers"]): r["late_images_per_s"]
        if r["buffered"]
        else r["images_per_s"]
        for r in rows
    }
    for row in rows:
        rate = fair[row["pipeline"], row["workers"]]
        timm = fair.get(("timm", row["workers"]))
        base = fair.get((row["pipeline"], 0))
        row["images_per_s_per_worker"] = rate / max(row["workers"], 1) if rate else None
        row["vs_timm"] = rate / timm if rate and timm and row["pipeline"] != "timm" else None
        row["vs_0_workers"] = rate / base if rate and base and row["workers"] > 0 else None
    return rows
