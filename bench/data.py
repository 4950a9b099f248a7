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

This file sets up (folders, the "before" worktree) and runs; the cases and their harness are in
`data_cases.py`, the two measurements in `data_measure.py`, the markdown in `data_report.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_like
from data_cases import REPO
from data_measure import measure_startup, measure_throughput
from data_report import markdown

# ---------------------------------------------------------------------------------------------
# Set-up: folders, the "before" worktree, the machine.


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
