"""Where the host input pipeline's time goes, per image and per core, old path against new.

    python bench/host_stages.py --quick             # ~1 min; what the GPU host runs
    python bench/host_stages.py                     # ~3 min, more images and rounds

Pins itself to one core (the first it may use, or `--core`) and times with that thread's CPU
clock, so other processes on a shared machine change little. On ImageNet-shaped JPEGs from
`bench/imagenet_like.py` (500×375 / 375×500, ~115 KB, written to a temporary folder), at 224
with DeiT's training augmentation (random-resized crop, flip, RandAugment rand-m9-mstd0.5-inc1):

1. The stage table: ms per image of each stage of the old path (`bench/transforms_before.py`, the
   package before issue 27) and of the new one (`deit.data.host.train_transform_encoded`): file
   read, header + crop draw, JPEG decode, crop + resize, flip, RandAugment (and each of its ops
   at m9), conversion to numpy, batching, the copies through grain's shared memory, and
   `jax.device_put` of a batch to the default device (the GPU on a GPU host).
2. Old against new, per core: images per CPU-second of the whole per-image path, the cases
   interleaved over rounds (the least of each), with each lever added in turn (PIL end to end,
   simplejpeg, JPEG DCT scaling); the same on photos 2.5 times larger (`--large`); and old
   against new inside the pipeline's batch function (reading from the folder, batching).

Writes `OUT/host_stages_<cpu>.{json,md}` (default OUT: bench/results) and prints the markdown.
Needs only the package's runtime dependencies (simplejpeg optional: its rows say when absent).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
if (BENCH.parent / "src" / "deit").is_dir():  # this checkout's package, installed or not
    sys.path.insert(0, str(BENCH.parent / "src"))

from deit.data import host as new  # noqa: E402
from deit.data import randaugment  # noqa: E402


def _bench_module(name: str) -> Any:
    """A script beside this one, imported by path (the folder is not put on sys.path, where its
    data.py would shadow other modules)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


imagenet_like = _bench_module("imagenet_like")
old = _bench_module("transforms_before")

RA = "rand-m9-mstd0.5-inc1"


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_ms(fn: Callable[[int], Any], n: int, rounds: int) -> float:
    """The least over `rounds` of the CPU ms per call of `fn(0..n-1)` (this thread's clock): on
    a shared core, other processes only ever add (cache refills, migrations), so the least run
    is the one closest to the work itself."""
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for i in range(n):
            fn(i)
        times.append((time.thread_time() - t0) / n * 1e3)
    return min(times)


class Data:
    """The generated files, their bytes, and what each stage starts from."""

    def __init__(self, root: Path, count: int, size: int) -> None:
        per_class = -(-count // 4)
        imagenet_like.generate(root, 4, per_class, 1, workers=1, progress=False)
        self.files = sorted((root / "train").glob("*/*.JPEG"))[:count]
        self.raw = [f.read_bytes() for f in self.files]
        self.size = size
        self.n = len(self.files)
        self.ra_old = old.RandAugment.from_string(RA)
        self.ra_new = new.RandAugment.from_string(RA)
        self.arrays = [old.decode_image(b) for b in self.raw]
        self.boxes = [
            old.random_resized_crop_box(a.shape[0], a.shape[1], self.rng(i))
            for i, a in enumerate(self.arrays)
        ]
        self.pils = [Image.open(io.BytesIO(b)) for b in self.raw]
        for p in self.pils:
            p.load()
        self.crops = [
            old.random_resized_crop(a, self.rng(i), size) for i, a in enumerate(self.arrays)
        ]
        self.crop_pils = [Image.fromarray(c) for c in self.crops]

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([0, 0, i])


def _pil_decoder(enabled: bool) -> Callable:
    """Context-free switch: with `enabled` False, the package decodes through PIL only."""
    real = new._simplejpeg

    def pick() -> Any:
        return real() if enabled else None

    return pick


def stage_rows(d: Data, rounds: int) -> list[dict[str, Any]]:
    """(path, stage, ms per image) rows; `expected` scales a stage by how often it runs."""
    size, n = d.size, d.n
    res = new._resample("bicubic")
    rows: list[dict[str, Any]] = []

    def add(path: str, stage: str, fn: Callable[[int], Any], share: float = 1.0) -> None:
        ms = cpu_ms(fn, n, rounds)
        rows.append(
            {"path": path, "stage": stage, "ms": ms, "share": share, "per_image": ms * share}
        )

    add("both", "file read", lambda i: d.files[i].read_bytes())
    # old: decode_image (PIL decode, convert("RGB") copy, np.array copy), numpy crop, PIL resize
    add("old", "JPEG decode to a full array (PIL)", lambda i: old.decode_image(d.raw[i]))

    def old_crop(i: int) -> Any:
        top, left, ch, cw = d.boxes[i]
        crop = Image.fromarray(d.arrays[i][top : top + ch, left : left + cw])
        return np.asarray(crop.resize((size, size), res)).copy()

    add("old", "crop + bicubic resize (array slice, PIL resize, copy)", old_crop)
    add(
        "old",
        "flip (numpy reversed copy), half the images",
        lambda i: d.crops[i][:, ::-1].copy(),
        0.5,
    )
    add("old", "RandAugment (array -> PIL -> array)", lambda i: d.ra_old(d.crops[i], d.rng(i)))

    def header(i: int) -> Any:
        with Image.open(io.BytesIO(d.raw[i])) as img:
            w, h = img.size
            return new.random_resized_crop_box(h, w, d.rng(i))

    add("new", "header + crop draw (PIL open)", header)
    sj = new._simplejpeg()
    if sj is not None:
        add("new", "JPEG decode, simplejpeg, to array", lambda i: sj.decode_jpeg(d.raw[i]))
    add("new", "JPEG decode, PIL (no array)", lambda i: Image.open(io.BytesIO(d.raw[i])).load())

    def draft(i: int, s: int) -> Any:
        img = Image.open(io.BytesIO(d.raw[i]))
        img.draft("RGB", (img.size[0] // s, img.size[1] // s))
        return img.load()

    for s in (2, 4):
        add("new", f"JPEG decode at 1/{s} (DCT scaling, PIL draft)", functools.partial(draft, s=s))

    def new_crop(i: int) -> Any:
        top, left, ch, cw = d.boxes[i]
        return Image.fromarray(d.arrays[i][top : top + ch, left : left + cw]).resize(
            (size, size), res
        )

    add("new", "crop + bicubic resize (array slice -> PIL)", new_crop)

    def pil_crop(i: int) -> Any:
        top, left, ch, cw = d.boxes[i]
        return d.pils[i].crop((left, top, left + cw, top + ch)).resize((size, size), res)

    add("new", "crop + bicubic resize (PIL crop)", pil_crop)
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    add(
        "new",
        "flip (PIL transpose), half the images",
        lambda i: d.crop_pils[i].transpose(flip),
        0.5,
    )
    add("new", "RandAugment (on PIL)", lambda i: d.ra_new.augment(d.crop_pils[i], d.rng(i)))
    add("new", "to numpy (224 image)", lambda i: np.array(d.crop_pils[i]))
    # each op at m9 when applied; a RandAugment image applies 2 x 0.5 = 1 op on average, each
    # of the 15 with probability 1/15
    for name in d.ra_new.ops:
        op = randaugment._OPS[name]
        add(
            "op",
            name,
            lambda i, op=op: op(d.crop_pils[i], 0.9, d.rng(i).choice((-1.0, 1.0)), d.ra_new),
            1 / 15,
        )
    batch = np.stack(d.crops[: min(n, 64)])
    b = len(batch)
    add(
        "both",
        f"batching (np.stack of {b})",
        lambda i: np.stack(d.crops[:b]) if i % b == 0 else None,
    )
    # grain's workers write each batch to shared memory, the main process copies it out
    out = np.empty_like(batch)
    add(
        "both",
        "IPC: 2 copies through shared memory",
        lambda i: (np.copyto(out, batch), np.array(out)) if i % b == 0 else None,
    )
    return rows


def device_put_row(d: Data, rounds: int) -> dict[str, Any] | None:
    try:
        import jax
    except ImportError:
        return None
    batch = np.stack([d.crops[i % d.n] for i in range(64)])
    jax.device_put(batch).block_until_ready()
    times = []
    for _ in range(max(rounds, 3)):
        t0 = time.perf_counter()
        jax.device_put(batch).block_until_ready()
        times.append((time.perf_counter() - t0) / len(batch) * 1e3)
    ms = statistics.median(times)
    where = str(jax.devices()[0].platform)
    stage = f"jax.device_put of a batch of 64 to {where} (wall)"
    return {"path": "both", "stage": stage, "ms": ms, "share": 1.0, "per_image": ms}


def enlarged(raw: list[bytes], factor: float) -> list[bytes]:
    """The same JPEGs `factor` times larger on each side (bicubic, quality 90): the large photos
    of ImageNet's tail, where the crop is often twice the training size or more."""
    out = []
    for data in raw:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            big = img.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=imagenet_like.QUALITY)
        out.append(buf.getvalue())
    return out


def end_to_end(d: Data, rounds: int, raw: list[bytes] | None = None, label: str = "") -> list:
    """Per-core images/s of the whole per-image path: old, then each lever added in turn."""
    size = d.size
    sj = new._simplejpeg() is not None
    raw = d.raw if raw is None else raw

    def run_old(i: int) -> Any:
        return old.train_transform(old.decode_image(raw[i]), d.rng(i), size, randaugment=d.ra_old)

    def run_new(i: int, dct: bool) -> Any:
        return new.train_transform_encoded(raw[i], d.rng(i), size, randaugment=d.ra_new, dct=dct)

    cases: list[tuple[str, Callable, bool]] = [
        ("old path (before issue 27)", run_old, True),
        (
            "+ PIL end to end, no full-image array, PIL flip",
            functools.partial(run_new, dct=False),
            False,
        ),
    ]
    if sj:
        cases.append(("+ simplejpeg decode", functools.partial(run_new, dct=False), True))
    cases.append(
        (
            "+ JPEG DCT scaling where the crop allows (new path)",
            functools.partial(run_new, dct=True),
            sj,
        )
    )
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    real = new._simplejpeg
    for _ in range(rounds):  # interleaved: every case once per round
        for name, fn, use_sj in cases:
            new._simplejpeg = _pil_decoder(use_sj)
            try:
                times[name].append(cpu_ms(fn, len(raw), 1))
            finally:
                new._simplejpeg = real
    base = min(times[cases[0][0]])
    rows = []
    for name, _, _ in cases:
        ms = min(times[name])
        rows.append(
            {
                "case": name + label,
                "ms": ms,
                "img_s": 1e3 / ms,
                "x_old": base / ms,
                "runs": times[name],
            }
        )
    return rows


def pipeline_rows(d: Data, root: Path, rounds: int) -> list[dict[str, Any]]:
    """One pipeline element (`data.pipeline._MakeBatch`: reading each record from the folder,
    the per-image path, batching), CPU ms per image, with the new per-image path and with the
    old one put in its place. grain's threads and workers are left out: they only overlap it."""
    from deit.data import DataConfig, load_sources, pipeline

    cfg = DataConfig(dataset=str(root), img_size=d.size, workers=0, repeats=1)
    home = os.environ.get("DEIT_HOME")
    os.environ["DEIT_HOME"] = str(root / "home")  # the folder's index: not in the user's cache
    try:
        train, _ = load_sources(cfg)
    finally:
        if home is None:
            del os.environ["DEIT_HOME"]
        else:
            os.environ["DEIT_HOME"] = home
    batch = min(16, len(train))
    plan = pipeline.Plan(len(train), 0, batch, epochs=1, seed=0)
    make = pipeline._MakeBatch(plan, train, train, cfg)
    steps = plan.steps_per_epoch

    def old_augment(source: Any, i: int, seed: list[int]) -> np.ndarray:
        img = old.decode_image(source.name(i))
        return old.train_transform(img, np.random.default_rng(seed), d.size, randaugment=d.ra_old)

    kinds = {"old": old_augment, "new": make._augment}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, augment in kinds.items():
            object.__setattr__(make, "_augment", augment)
            t0 = time.thread_time()
            for k in range(steps):
                make(k)
            times[kind].append((time.thread_time() - t0) / (steps * batch) * 1e3)
    base = min(times["old"])
    rows = []
    for kind, runs in times.items():
        ms = min(runs)
        case = f"{kind} path in the pipeline's batch function (folder reads, batch {batch})"
        rows.append({"case": case, "ms": ms, "img_s": 1e3 / ms, "x_old": base / ms, "runs": runs})
    return rows


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Host input pipeline, per image and per core: {m['cpu']}",
        "",
        f"`{report['command']}`: one core (taskset to core {m['core']}), this thread's CPU time, "
        f"{report['images']} ImageNet-shaped JPEGs (500×375 / 375×500, ~115 KB, "
        f"`bench/imagenet_like.py`), training size {report['size']}, `{RA}`; the least of "
        f"{report['rounds']} interleaved rounds. simplejpeg: {m['simplejpeg'] or 'not installed'}; "
        f"Pillow {m['pillow']}, numpy {m['numpy']}, Python {m['python']}.",
        "",
        "## Old against new, per core",
        "",
        "| path | ms / image | img/s per core | × old |",
        "|---|---:|---:|---:|",
    ]
    for r in report["end_to_end"] + report["pipeline"]:
        lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['img_s']:.0f} | {r['x_old']:.2f} |")
    lines += [
        "",
        "## Where the time goes (CPU ms; 'per image' weighs a stage by how often it runs)",
        "",
        "| path | stage | ms when run | ms per image |",
        "|---|---|---:|---:|",
    ]
    for r in report["stages"]:
        lines.append(f"| {r['path']} | {r['stage']} | {r['ms']:.3f} | {r['per_image']:.3f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="32 images, 5 rounds (~1 min)")
    parser.add_argument("--images", type=int, default=None, help="default 32 quick, 64 full")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 quick, 7 full")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--core", type=int, default=None, help="default: the first usable core")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--large", type=float, default=2.5, help="also time photos this many times larger (0: no)"
    )
    parser.add_argument("--no-pipeline", action="store_true", help="skip the batch-function rows")
    args = parser.parse_args(argv)
    usable = os.sched_getaffinity(0)
    core = args.core if args.core is not None else min(usable)
    os.sched_setaffinity(0, {core})
    try:
        return _run(args, core)
    finally:
        os.sched_setaffinity(0, usable)


def _run(args: argparse.Namespace, core: int) -> int:
    images = args.images or (32 if args.quick else 64)
    rounds = args.rounds or (5 if args.quick else 7)
    sj = new._simplejpeg()
    from importlib import metadata

    machine = {
        "cpu": cpu_name(),
        "core": core,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "simplejpeg": metadata.version("simplejpeg") if sj is not None else None,
    }
    command = "python bench/host_stages.py" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="host_stages_") as tmp:
        root = Path(tmp) / "imagenet_like"
        d = Data(root, images, args.size)
        stages = stage_rows(d, rounds)
        put = device_put_row(d, rounds)
        if put is not None:
            stages.append(put)
        e2e = end_to_end(d, rounds)
        if args.large:
            big = enlarged(d.raw[: max(8, d.n // 4)], args.large)
            with Image.open(io.BytesIO(big[0])) as img:
                shape = "×".join(map(str, img.size))
            e2e += end_to_end(d, rounds, big, f", {shape} JPEGs ({args.large:g}× larger)")
        pipe = [] if args.no_pipeline else pipeline_rows(d, root, rounds)
    report = {
        "command": command,
        "machine": machine,
        "images": d.n,
        "size": args.size,
        "rounds": rounds,
        "stages": stages,
        "end_to_end": e2e,
        "pipeline": pipe,
        "seconds": time.perf_counter() - t0,
    }
    text = markdown(report)
    print(text)
    slug = re.sub(r"[^a-z0-9]+", "_", machine["cpu"].lower()).strip("_") or "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_stages_{slug}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.md and .json ({report['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
