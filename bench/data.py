"""The input-pipeline benchmark: start-up time and steady-state images/s, one interleaved run.

    python bench/data.py OUT_DIR            # ~15-20 min on 2 cores the first time; ~10 GB
    python bench/data.py OUT_DIR --sizes 500 --batches 8 --rounds 1 --workers 0 2   # a check

1. Generates ImageNet-like folders under OUT_DIR with `bench/imagenet_like.py` (10k = 100
   classes × 100 training images, 50k = 1000 × 50; 10 validation images per class), reused when
   present.
2. Start-up: seconds from just before `import deit.data` to the first training batch on the host
   (no XLA involved), per size, for "before" (the package at `--before`, in a git worktree under
   /tmp) and "after" (this working tree), on a fresh start and on a resume. "After" starts with an
   empty `$DEIT_HOME`, so it lists the folder and writes its index; its resume reuses that index.
   "Before" decodes every image on every start, so its resume is a second identical run; when its
   runs for a size would exceed `--before-budget` seconds it runs once (resume = start) or, if
   even one run would, is estimated from a smaller size's per-file rate. A bare `os.scandir`
   over every class folder, in the same kind of fresh interpreter, is the reference for how
   start-up should grow with the number of files. Workers: `--startup-workers` (default 2).
3. Steady state: images/s of the training pipeline at 224 (decode, random-resized crop, flip,
   RandAugment rand-m9-mstd0.5-inc1, batch `--batch`) with each of `--workers`, on the smallest
   size's folder (or `--throughput-size`): ours from the folder, ours from ArrayRecord shards
   (`deit data pack`, once), the old pipeline (records listed directly, without its start-up
   decode pass) and timm's own loader on the same files (`timm.data.create_transform` on a
   torchvision `ImageFolder`, a torch `DataLoader`, torch threads left at their defaults).
   Batches 1..`--warmup`-1 are skipped so prefetch buffers do not inflate the rate; the next
   `--batches` are timed, and a window whose first half came >15% faster than its second is
   flagged (a buffer was still draining) and rated by its second half.

Every case runs in its own fresh interpreter, the cases interleaved over `--rounds` rounds, and
the median is reported. The CPU time other processes took during each case is recorded (from
/proc/stat) and the report warns when it was more than a quarter core: run it on a quiet machine.
Writes OUT_DIR/data_bench.json and OUT_DIR/data_bench.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_like

REPO = Path(__file__).resolve().parents[1]
AFTER_SRC = REPO / "src"

# ---------------------------------------------------------------------------------------------
# The pipelines, as code run in a fresh interpreter. `P` holds the case's parameters (dataset,
# workers, batch, img_size), `mark(name)` notes the seconds since the clock started (just before
# the first import) and `INFO` takes anything else to report. Each must leave `it`, an iterator
# of batches (dicts with "label", or (images, labels) tuples). Adjust AFTER_PIPELINE to the new
# API as it settles.

AFTER_PIPELINE = """
from deit.data import DataConfig, load_sources, train_batches
mark("import")
cfg = DataConfig(dataset=P["dataset"], img_size=P["img_size"], workers=P["workers"])
train, val = load_sources(cfg)
mark("load_sources")
it = iter(train_batches(train, cfg, seed=0, global_batch=P["batch"], epochs=1))
"""

BEFORE_PIPELINE = """
from deit.data import DataConfig, load_sources, train_batches
mark("import")
cfg = DataConfig(dataset=P["dataset"], img_size=P["img_size"], workers=P["workers"])
train, val = load_sources(cfg)
mark("load_sources")
it = iter(train_batches(train, cfg, seed=0, epoch=0, global_batch=P["batch"]))
"""

# The old pipeline's steady state: its records listed directly, skipping the decode-everything
# pass of its `load_sources` (which the start-up table measures).
BEFORE_PIPELINE_LISTED = """
import numpy as np
from deit.data import DataConfig, Source, train_batches
mark("import")
root = os.path.join(P["dataset"], "train")
classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
files, labels = [], []
for label, name in enumerate(classes):
    names = sorted(e.name for e in os.scandir(os.path.join(root, name)))
    files += [os.path.join(root, name, n) for n in names if n.endswith(".JPEG")]
    labels += [label] * (len(files) - len(labels))
train = Source(files, np.asarray(labels, np.int32), classes)
mark("load_sources")
cfg = DataConfig(dataset=P["dataset"], img_size=P["img_size"], workers=P["workers"])
it = iter(train_batches(train, cfg, seed=0, epoch=0, global_batch=P["batch"]))
"""

# Pillow 13 refuses to keep 0 bits, which timm's PosterizeIncreasing asks for at magnitude 10
# (reached with mstd0.5); the older Pillow timm was written against gave a black image. The
# stand-in keeps that result at the same cost (one lookup table), so the loader runs as timm meant.
TIMM_PIPELINE = """
import timm.data
import timm.data.auto_augment as aa
import torch
import torchvision.datasets
mark("import")
def posterize(img, bits_to_keep, **_):
    if bits_to_keep >= 8:
        return img
    mask = (0xFF << (8 - max(bits_to_keep, 0))) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))
for name, op in list(aa.NAME_TO_OP.items()):
    if op is aa.posterize:
        aa.NAME_TO_OP[name] = posterize
torch.manual_seed(0)
transform = timm.data.create_transform(
    P["img_size"],
    is_training=True,
    auto_augment="rand-m9-mstd0.5-inc1",
    interpolation="bicubic",
    re_prob=0.25,
)
ds = torchvision.datasets.ImageFolder(os.path.join(P["dataset"], "train"), transform)
mark("load_sources")
W = P["workers"]
loader = torch.utils.data.DataLoader(
    ds, batch_size=P["batch"], shuffle=True, num_workers=W, drop_last=True,
    persistent_workers=W > 0,
)
INFO["torch_threads"] = torch.get_num_threads()
it = iter(loader)
"""

SCAN = """
n = 0
for split in ("train", "val"):
    with os.scandir(os.path.join(P["dataset"], split)) as classes:
        for entry in classes:
            if entry.is_dir():
                with os.scandir(entry.path) as files:
                    n += sum(1 for _ in files)
mark("scan")
INFO["files"] = n
it = iter([None])
"""

HARNESS = """
import json, os, sys, time
P = json.loads(sys.argv[1])
INFO, MARKS = {}, {}
def mark(name):
    MARKS[name] = time.perf_counter() - T0
def busy_cpu_s():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
T0 = time.perf_counter()
#BODY#
first = next(it)
mark("first_batch")
if isinstance(first, dict):
    INFO["batch"] = [list(first["image"].shape), str(first["image"].dtype)]
elif first is not None:
    INFO["batch"] = [list(first[0].shape), str(first[0].dtype)]
if P.get("batches"):
    for _ in range(P["warmup"] - 1):
        next(it)
    sizes, arrivals = [], []
    busy = busy_cpu_s()
    tick = time.perf_counter()
    for b in it:
        sizes.append(len(b["label"]) if isinstance(b, dict) else len(b[1]))
        arrivals.append(time.perf_counter() - tick)
        if len(sizes) == P["batches"]:
            break
    images, seconds, half = sum(sizes), arrivals[-1], len(sizes) // 2
    late = sum(sizes[half:]) / (arrivals[-1] - arrivals[half - 1]) if half else None
    INFO.update(images=images, steps=len(sizes), seconds=seconds, images_per_s=images / seconds)
    INFO.update(late_images_per_s=late, arrivals=arrivals)
    if busy is not None:
        INFO["window_busy_cores"] = (busy_cpu_s() - busy) / seconds
    mark("window_end")
    since = MARKS["window_end"] - MARKS["load_sources"]
    INFO["from_start_images_per_s"] = (P["warmup"] * P["batch"] + images) / since
INFO["deit"] = getattr(sys.modules.get("deit"), "__file__", None)
print("RESULT " + json.dumps({"marks": MARKS, **INFO}), flush=True)
"""


def run_case(
    body: str,
    params: dict[str, Any],
    *,
    src: Path | None,
    cwd: Path,
    timeout: float,
    deit_home: Path | None = None,
) -> dict[str, Any]:
    """Runs `body` in a fresh interpreter with `PYTHONPATH=src`; its RESULT, or an `error`."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    if deit_home is not None:
        env["DEIT_HOME"] = str(deit_home)
    code = HARNESS.replace("#BODY#", body.strip())
    busy, mine = _busy_cpu_s(), _children_cpu_s()
    tick = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(params)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can end its workers too
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group is still its own
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "stderr": err[-2000:]}
    wall = time.perf_counter() - tick
    result: dict[str, Any] = {"process_s": wall}
    if busy is not None:
        # CPU time the whole machine spent minus this case's own: what other processes took.
        others = (_busy_cpu_s() - busy) - (_children_cpu_s() - mine)
        result["others_cores"] = max(0.0, others / wall)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**result, "error": _exception(err, proc.returncode), "stderr": err[-4000:]}
    result.update(json.loads(lines[-1][len("RESULT ") :]))
    where = result.get("deit")
    if src is not None and where and not Path(where).resolve().is_relative_to(src.resolve()):
        result["error"] = f"imported deit from {where}, expected it under {src}"
    return result


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def _exception(stderr: str, returncode: int) -> str:
    """The last exception line of a traceback (not a warning printed after it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    found = [line for line in lines if _EXCEPTION.match(line)]
    return (found or lines or [f"exit status {returncode}"])[-1][:300]


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time the machine has spent busy since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------
# Set-up: folders, the "before" worktree, shards.


def parse_size(text: str) -> tuple[int, int]:
    """`10000` -> (100 classes, 100 per class); `1000x50` -> (1000, 50)."""
    if "x" in text:
        classes, per_class = (int(v) for v in text.split("x"))
    else:
        n = int(text)
        classes = 1000 if n >= 50_000 else 100 if n >= 10_000 else 10
        per_class = max(1, n // classes)
    return classes, per_class


def short(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def before_worktree(commit: str) -> Path:
    """A detached worktree of `commit` at /tmp/deit-before-<commit>, reused when present."""
    full = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"deit-before-{commit}"
    if path.exists():
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        if head != full:
            raise SystemExit(f"{path} exists but is at {head or 'no commit'}, not {full}")
    else:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), full],
            check=True,
            capture_output=True,
        )
    return path


def describe_after() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head} + uncommitted changes under src/" if dirty else head


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
        return {"error": _exception(proc.stderr, proc.returncode), "stderr": proc.stderr[-4000:]}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"seconds": seconds, "bytes": size, "files": sum(1 for _ in out.rglob("*"))}
    record.write_text(json.dumps(result))
    return result


def machine() -> dict[str, Any]:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    versions = {}
    for name in ("numpy", "pillow", "grain", "array_record", "torch", "torchvision", "timm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------
# The two measurements.


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


# ---------------------------------------------------------------------------------------------
# Report.


def _s(value: float | None, estimated: bool = False) -> str:
    if value is None:
        return "—"
    text = (
        f"{value:.4f}"
        if value < 0.1
        else f"{value:.3f}"
        if value < 1
        else f"{value:.2f}"
        if value < 10
        else f"{value:.1f}"
        if value < 100
        else f"{value:.0f}"
    )
    return f"~{text} (est.)" if estimated else text


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    v = m["versions"]
    lines = [
        "# Input pipeline: start-up and steady state",
        "",
        f"CPU: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} online); "
        f"Python {m['python']}, numpy {v['numpy']}, Pillow {v['pillow']}, grain {v['grain']}, "
        f"torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}.",
        f"before = deit at {cfg['before']}; after = {cfg['after']}. Medians of {cfg['rounds']} "
        "interleaved rounds, each case in a fresh interpreter.",
        "",
        "Folders (bench/imagenet_like.py: 500×375 / 375×500 JPEG q90):",
        "",
    ]
    for key, f in report["folders"].items():
        lines.append(
            f"- {key}: {f['classes']} classes × {f['train_per_class']} train + "
            f"{f['val_per_class']} val = {f['files']} files, {f['mean_kb']:.0f} KB per file"
        )
    startup = report.get("startup")
    if startup:
        lines += [
            "",
            "## Start-up: seconds to the first training batch",
            "",
            f"From just before `import deit.data` (which imports jax) to the first batch of "
            f"{cfg['batch']}; no XLA compile. before: `load_sources` decodes every image, on every "
            "start. after: start = empty `$DEIT_HOME` (lists the folder, writes the index); "
            "resume = the same `$DEIT_HOME` again. scan: a bare `os.scandir` of every class "
            "folder (train and val) in a fresh interpreter.",
            "",
            "| size | files | workers | scan | before start | before resume | after start "
            "| after resume | after import | after start − import |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in startup["summary"]:
            est = row["before mode"] == "estimated"
            imp = row.get("after start import")
            net = row["after start"] - imp if row["after start"] is not None and imp else None
            lines.append(
                f"| {row['size']} | {row['files']} | {row['workers']} | {_s(row['scan'])} "
                f"| {_s(row['before start'], est)} | {_s(row['before resume'], est)} "
                f"| {_s(row['after start'])} | {_s(row['after resume'])} | {_s(imp)} "
                f"| {_s(net)} |"
            )
        notes = [r for r in startup["summary"] if r["before mode"] in ("single", "estimated")]
        for row in notes:
            what = (
                "ran once (resume = start)"
                if row["before mode"] == "single"
                else "estimated from the smaller size's per-file rate"
            )
            lines.append(f"\nbefore at {row['size']}: {what}, over the --before-budget.")
        growth = _growth(startup["summary"])
        if growth:
            lines += ["", growth]
    tp = report.get("throughput")
    if tp:
        pack = tp.get("pack")
        lines += [
            "",
            f"## Steady state: training pipeline at {cfg['img_size']}, batch {cfg['batch']}",
            "",
            f"On {report['throughput_size']}: decode, random-resized crop, flip, RandAugment "
            f"rand-m9-mstd0.5-inc1. Images/s over batches {cfg['warmup']}..."
            f"{cfg['warmup'] + cfg['batches'] - 1} (the first ones skipped so prefetching does "
            "not inflate it); first batch = seconds from the first import. Per worker = img/s ÷ "
            "max(workers, 1) (0 workers: in the main process, which may still use several cores "
            "through threads); cores busy = the whole machine's CPU use during the timed batches "
            "(the pipeline's own on a quiet machine).",
            "",
            "| pipeline | workers | first batch s | img/s | img/s per worker | cores busy "
            "| × timm | × 0 workers |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in tp["summary"]:
            rate, each = _n(row["images_per_s"]), _n(row["images_per_s_per_worker"])
            if row["rate"] != "images_per_s":
                rate += " ‡"
            if row["buffered"]:
                rate += f" † ({_n(row['late_images_per_s'])})"
            lines.append(
                f"| {row['pipeline']} | {row['workers']} | {_s(row['first_batch_s'])} "
                f"| {rate} | {each} | {_f(row['busy_cores'])} | {_x(row['vs_timm'])} "
                f"| {_x(row['vs_0_workers'])} |"
            )
        threads = {r.get("torch_threads") for r in tp["summary"] if r.get("torch_threads")}
        lines += [
            "",
            "ours yields uint8 HWC images (normalisation is done on the device); timm's transform "
            "also makes float CHW tensors, normalises and applies random erasing (re_prob 0.25). "
            f"torch left at its defaults: {', '.join(map(str, sorted(threads))) or '?'} intra-op "
            "thread(s) in the main process (DataLoader workers use 1 each). before (folder) is "
            "the old pipeline with its records listed directly (no start-up decode pass); its "
            "grain reads ahead with 16 threads into a 500-batch buffer even with 0 workers, so "
            "‡ its rate is taken from the iterator's creation to the end of the timed batches.",
        ]
        if any(r["buffered"] for r in tp["summary"]):
            lines.append(
                "† the first half of the timed batches came >15% faster than the second: a "
                "prefetch buffer was still draining; (in brackets) the second half's rate, which "
                "the per-worker rate and the ratios use. Use more --batches or a larger --warmup."
            )
        if pack and "error" not in pack:
            lines.append(
                f"Shards: `deit data pack` took {pack['seconds']:.1f} s, "
                f"{pack['bytes'] / 1e6:.0f} MB."
            )
    lines += ["", _contention(report)]
    errors = _errors(report)
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"


def _growth(rows: list[dict]) -> str | None:
    sizes = sorted({(r["files"], r["size"]) for r in rows})
    if len(sizes) < 2:
        return None
    (n0, k0), (n1, k1) = sizes[0], sizes[-1]
    lo = next(r for r in rows if r["size"] == k0)
    hi = next(r for r in rows if r["size"] == k1 and r["workers"] == lo["workers"])
    parts = [f"files ×{n1 / n0:.1f}"]
    for kind in ("scan", "before start", "after start", "after resume"):
        if lo.get(kind) and hi.get(kind):
            parts.append(f"{kind} ×{hi[kind] / lo[kind]:.1f}")
    imp0, imp1 = lo.get("after start import"), hi.get("after start import")
    if lo.get("after start") and hi.get("after start") and imp0 and imp1:
        net = (hi["after start"] - imp1) / max(lo["after start"] - imp0, 1e-9)
        parts.append(f"after start less import ×{net:.1f}")
    return f"From {k0} to {k1} ({lo['workers']} workers): " + ", ".join(parts) + "."


def _contention(report: dict) -> str:
    loads = [
        r["others_cores"]
        for part in ("startup", "throughput")
        for r in (report.get(part) or {}).get("raw", [])
        if "others_cores" in r
    ]
    if not loads:
        return "Other processes' CPU use during the cases: not measured (no /proc/stat)."
    busy = sum(v > 0.25 for v in loads)
    text = (
        f"Other processes' CPU use during the cases: mean {statistics.mean(loads):.2f} cores, "
        f"max {max(loads):.2f} (of {report['machine']['usable_cores']})."
    )
    if busy:
        text += (
            f" **{busy} of {len(loads)} cases ran beside more than a quarter core of other work: "
            "rerun on a quiet machine before quoting them.**"
        )
    return text


def _errors(report: dict) -> list[str]:
    seen, out = set(), []
    for part in ("startup", "throughput"):
        for r in (report.get(part) or {}).get("raw", []):
            if "error" in r:
                name = r.get("kind") or r.get("pipeline")
                key = (name, r["error"])
                if key not in seen:
                    seen.add(key)
                    out.append(f"- {name}: {r['error']}")
    pack = (report.get("throughput") or {}).get("pack") or {}
    if "error" in pack:
        out.append(f"- deit data pack: {pack['error']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, help="folder for the image folders and the results")
    parser.add_argument("--sizes", nargs="+", default=["10000", "50000"], help="N or CxP")
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="throughput")
    parser.add_argument("--startup-workers", type=int, nargs="+", default=[2])
    parser.add_argument(
        "--throughput-size", default=None, help="one of --sizes (default: the smallest)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=5, help="first timed batch's index")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--before", default="9035d9b", help="the commit called 'before'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--before-budget",
        type=float,
        default=600.0,
        help="seconds the 'before' start-up runs of one size may take in all",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per case, seconds")
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--skip-after", action="store_true")
    parser.add_argument("--skip-shards", action="store_true")
    parser.add_argument("--skip-timm", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"machine": machine(), "folders": {}}
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report["config"]["after"] = describe_after()
    sizes = sorted((parse_size(s) for s in args.sizes), key=lambda cp: cp[0] * cp[1])
    tp_key = short(sizes[0][0] * sizes[0][1])
    if args.throughput_size is not None:
        tp_key = short(math.prod(parse_size(args.throughput_size)))
        if tp_key not in {short(c * p) for c, p in sizes}:
            raise SystemExit(f"--throughput-size {args.throughput_size} is not one of --sizes")
    folders = {}
    for classes, per_class in sizes:
        root = args.out / f"imagenet_like_{classes}x{per_class}_val{args.val_per_class}"
        print(f"folder {root}", file=sys.stderr, flush=True)
        gen = imagenet_like.generate(root, classes, per_class, args.val_per_class)
        folders[short(classes * per_class)] = gen
    report["folders"] = folders
    before_src = None if args.skip_before else before_worktree(args.before) / "src"
    if not args.skip_startup:
        report["startup"] = measure_startup(args, folders, before_src)
    if not args.skip_throughput:
        report["throughput_size"] = tp_key
        report["throughput"] = measure_throughput(args, folders[tp_key], before_src)
    text = markdown(report)
    (args.out / "data_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "data_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
