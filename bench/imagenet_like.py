"""An ImageNet-shaped image folder of generated JPEGs, for timing input pipelines at scale.

    python bench/imagenet_like.py OUT --classes 100 --per-class 100      # 10k train, 1k val
    python bench/imagenet_like.py OUT --classes 1000 --per-class 1281    # 1.41M files, ~165 GB

Writes `OUT/train/<wnid>/<wnid>_<i>.JPEG` and `OUT/val/<wnid>/<wnid>_<i>.JPEG` with WordNet-id
shaped class folders (`n00000000`, `n00000001`, ...), `--per-class` training and `--val-per-class`
(default a tenth of it) validation images per class. The images are what an input pipeline sees in
ImageNet, not what a model could learn from: 500×375 and 375×500 (alternating), RGB, JPEG quality
90, ~115 KB on average (ImageNet's average is ~110 KB), so a decode costs about what a photo's does.
Each is a smooth colour field with a few soft-edged ellipses and rectangles (drawn at a quarter of
the size, blurred and upsampled bicubic) under a film-grain-like texture whose strength varies
across the image and from image to image (so file sizes spread from ~70 to ~170 KB).

Every image is a function of `(seed, split, class, index)` alone, whatever `--workers` is. A run
is resumable: files already present are skipped, and each file is written under a temporary name
and renamed, so a killed run never leaves a truncated JPEG under a final name. Run one generator
at a time per OUT. Speed: ~300 files/s on 2 cores (one process per usable core by default).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = ((500, 375), (375, 500))  # (width, height), by index parity
QUALITY = 90
SPLIT_IDS = {"train": 0, "val": 1}
BANK = 1024  # side of the square texture bank images are cut from
# Grain strengths (grey levels, the luma grain's std where the strength map is 1); a uniform pick
# per image. Calibrated so that files average ~115 KB at quality 90 (from ~70 to ~170 KB).
LEVELS = (14.0, 22.0, 30.0, 40.0, 52.0, 64.0)
CHUNK = 50  # files per task: small enough for a live progress line and even load


def wnid(label: int) -> str:
    """WordNet-id shaped class folder name: `n00000042`."""
    return f"n{label:08d}"


def file_name(label: int, index: int) -> str:
    return f"{wnid(label)}_{index}.JPEG"


def _normalised(noise: np.ndarray) -> np.ndarray:
    return (noise - noise.mean()) / noise.std()


@functools.cache
def _grain(seed: int) -> np.ndarray:
    """`(BANK, BANK)` float32 film-grain-like noise of unit std: pixel plus 2 and 4 pixel scales."""
    rng = np.random.default_rng([seed, 0x7E47])
    grain = rng.standard_normal((BANK, BANK), dtype=np.float32)
    for factor in (2, 4):
        small = rng.standard_normal((BANK // factor, BANK // factor), dtype=np.float32)
        up = Image.fromarray(small).resize((BANK, BANK), Image.Resampling.BICUBIC)
        grain += 0.5 * _normalised(np.asarray(up))
    return _normalised(grain)


def _hat_weights(length: int, knots: int) -> np.ndarray:
    """`(length, knots)` linear-interpolation weights from `knots` evenly spaced values."""
    t = np.linspace(0, knots - 1, length, dtype=np.float32)[:, None]
    return np.maximum(0, 1 - np.abs(t - np.arange(knots, dtype=np.float32)))


def _smooth_map(values: np.ndarray, w: int, h: int) -> np.ndarray:
    """`(h, w)` bilinear upsampling of a small `(k, k)` grid, as a sum of `k` outer products.

    No `@`: a BLAS matmul would start its own threads in every worker process and, on a few
    cores, make the pool slower than one process.
    """
    k = len(values)
    rows = (_hat_weights(h, k)[:, :, None] * values[None]).sum(1)  # (h, k)
    cols = _hat_weights(w, k)  # (w, k)
    out = rows[:, :1] * cols[:, 0]
    for j in range(1, k):
        out += rows[:, j : j + 1] * cols[:, j]
    return out


def render(seed: int, split: str, label: int, index: int) -> Image.Image:
    """The image `index` of class `label` in `split`: a deterministic photo-shaped RGB image."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], label, index])
    w, h = SIZES[index % 2]
    sw, sh = w // 4, h // 4
    # Low frequencies: a 2-5 x 2-5 random image around a random mean colour, upsampled bicubic.
    mean = rng.uniform(40, 215, 3)
    spread = rng.uniform(15, 60)
    gh, gw = (int(v) for v in rng.integers(2, 6, 2))
    field = np.clip(mean + spread * rng.standard_normal((gh, gw, 3)), 0, 255).astype(np.uint8)
    base = Image.fromarray(field).resize((sw, sh), Image.Resampling.BICUBIC)
    # Objects: a few ellipses and rectangles, soft-edged by the blur and the 4x upsampling.
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = int(rng.integers(-sw // 4, sw)), int(rng.integers(-sh // 4, sh))
        x1, y1 = x0 + int(rng.integers(6, sw // 2)), y0 + int(rng.integers(6, sh // 2))
        colour = np.clip(mean + 2 * spread * rng.standard_normal(3), 0, 255)
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(c) for c in colour))
    base = base.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
    image = np.asarray(base.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    # High frequencies: grain cut from the bank at random offsets (luma, and one chroma channel
    # at half strength), its strength an image-wide level times a smooth map, so that some
    # regions are busy and some nearly flat.
    grain = _grain(seed)
    level = LEVELS[int(rng.integers(len(LEVELS)))]
    strength = _smooth_map(rng.uniform(0.1, 1.9, (3, 3)).astype(np.float32) * level, w, h)
    oy, ox = int(rng.integers(0, BANK - h)), int(rng.integers(0, BANK - w))
    image += (grain[oy : oy + h, ox : ox + w] * strength)[..., None]
    oy, ox = int(rng.integers(0, BANK - w)), int(rng.integers(0, BANK - h))
    chroma = grain[oy : oy + w, ox : ox + h].T * strength
    image[..., int(rng.integers(3))] += 0.5 * chroma
    np.clip(image, 0, 255, out=image)
    return Image.fromarray(image.astype(np.uint8))


def _write_chunk(task: tuple[str, int, str, int, int, int]) -> tuple[int, int, int]:
    """Writes the missing files `start..stop-1` of one class folder: (written, skipped, bytes)."""
    root, seed, split, label, start, stop = task
    folder = Path(root) / split / wnid(label)
    folder.mkdir(parents=True, exist_ok=True)
    names = {file_name(label, i): i for i in range(start, stop)}
    present: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name in names:
                present[entry.name] = entry.stat().st_size
            elif entry.name.endswith(".tmp") and entry.name[1:].rsplit(".", 2)[0] in names:
                os.unlink(entry.path)  # a killed run's leftover for one of this chunk's files
    written = total = 0
    for name, index in names.items():
        size = present.get(name, 0)
        if size == 0:
            final = folder / name
            temp = folder / f".{name}.{os.getpid()}.tmp"
            try:
                render(seed, split, label, index).save(temp, "JPEG", quality=QUALITY)
                os.replace(temp, final)
            finally:
                temp.unlink(missing_ok=True)
            size = final.stat().st_size
            written += 1
        total += size
    return written, len(names) - written, total


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, every 10 s otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, written: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        elapsed = now - self.start
        rate = written / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{done}/{self.total} files, {written} written, {rate:.0f}/s, ETA {eta:.0f} s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line.ljust(60), end=end, file=sys.stderr, flush=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def generate(
    out: str | Path,
    classes: int,
    per_class: int,
    val_per_class: int | None = None,
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates (or completes) the folder; returns counts, bytes and seconds."""
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes {classes}, per_class {per_class}; expected 1 or more of each")
    val_per_class = max(1, per_class // 10) if val_per_class is None else val_per_class
    workers = usable_cores() if workers is None else max(1, workers)
    counts = {"train": per_class, "val": val_per_class}
    tasks = [
        (str(out), seed, split, label, start, min(start + CHUNK, count))
        for split, count in counts.items()
        for label in range(classes)
        for start in range(0, count, CHUNK)
    ]
    files = classes * (per_class + val_per_class)
    bar = _Progress(files, progress)
    tick = time.perf_counter()
    written = done = total_bytes = 0
    pool = Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_write_chunk, tasks) if pool else map(_write_chunk, tasks)
        for w, s, b in results:
            written, done, total_bytes = written + w, done + w + s, total_bytes + b
            bar.update(done, written)
    finally:
        if pool:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - tick
    bar.update(done, written, final=True)
    return {
        "root": str(out),
        "classes": classes,
        "train_per_class": per_class,
        "val_per_class": val_per_class,
        "files": files,
        "written": written,
        "skipped": files - written,
        "bytes": total_bytes,
        "mean_kb": total_bytes / files / 1000,
        "seconds": seconds,
        "written_per_s": written / seconds if seconds > 0 else 0.0,
        "workers": workers,
        "seed": seed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", help="the folder to write (train/ and val/ under it)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, required=True, help="training images per class")
    parser.add_argument(
        "--val-per-class", type=int, default=None, help="default max(1, per-class // 10)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help=f"processes (default {usable_cores()})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    r = generate(
        args.out,
        args.classes,
        args.per_class,
        args.val_per_class,
        args.workers,
        args.seed,
        not args.quiet,
    )
    print(
        f"{r['files']} files ({r['written']} written, {r['skipped']} already there), "
        f"{r['bytes']} bytes, {r['mean_kb']:.1f} KB per file, {r['seconds']:.1f} s "
        f"({r['written_per_s']:.0f} files/s written, {r['workers']} workers)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
