"""The `small` recipe's validation suite: folders a new user might bring, built here without
network, each trained with `deit train --data FOLDER` and nothing else (issue 25).

    taskset -c 1 python bench/small_suite.py run                 # every set, the recipe's budget
    taskset -c 1 python bench/small_suite.py run --sets digits28 --flags --time-budget 5m
    python bench/small_suite.py make /tmp/suite                  # only write the folders

The sets (`SETS`): scikit-learn's 8x8 digits at 16 px as they are; digits at 28 px grey,
3,000 / 1,000 (300 / 100 per class), redrawn with a random affine so that they look like a
28-px handwriting set (the validation images from originals the training images never use);
the same at 48 px in colour; generated shapes at 28 px grey; textures at 64 px colour; and
`shapes40c`, colour shapes at 40 px, kept out of the fitting of the recipe (`HELD_OUT`): its
row reports on choices that never saw it. Writes `bench/results/small_suite.{json,md}`: per
set, the folder's properties, the teacher's top-1 (the suite's CNN reference), the student's
averaged heads, the epochs of each and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent
RESULTS = HERE / "results"
HELD_OUT = ("shapes40c",)


@dataclass(frozen=True)
class SetSpec:
    """One generated ImageFolder: `make(root, rng)` writes `root/{train,val}/<class>/*.png`."""

    side: int
    colour: bool
    classes: int
    train: int  # per class
    val: int  # per class
    make: Callable[[SetSpec, Path, np.random.Generator], None]


def _save(img: Image.Image, root: Path, split: str, cls: str, i: int) -> None:
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{i:05d}.png")


def _colours(rng: np.random.Generator, colour: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and a background at least 0.35 apart in brightness."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if not colour:
            fg, bg = fg[:1].repeat(3), bg[:1].repeat(3)
        if abs(int(fg.mean()) - int(bg.mean())) > 90:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _ink(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Light tinted ink on dark tinted paper (as a street-number photo's white or yellow figures on
    a dark plate): each channel of the ink in 140-255, of the paper in 0-100. Random tints with
    either one the brighter left both the ResNet-8 and the DeiT at chance in 10 minutes
    (docs/small_recipe.md), which measures nothing about the recipe."""
    fg, bg = rng.integers(140, 256, 3), rng.integers(0, 101, 3)
    return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _finish(img: Image.Image, rng: np.random.Generator, colour: bool) -> Image.Image:
    """Pixel noise, and grey sets saved as one-channel images (as a user's folder would be)."""
    a = np.asarray(img, np.float32) + rng.normal(0, 8, (*img.size[::-1], 3))
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return out if colour else out.convert("L")


def _digits(spec: SetSpec, root: Path, rng: np.random.Generator) -> None:
    """scikit-learn's digits, split by original (70/30 per class), redrawn at `spec.side`:
    a random affine (rotation +-12 deg, scale 0.85-1.15, shift +-8%) of the upscaled digit."""
    from sklearn.datasets import load_digits

    data = load_digits()
    plain = spec.side == 16
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == k))
        cut = int(0.7 * len(idx))
        for split, pool, count in (
            ("train", idx[:cut], spec.train),
            ("val", idx[cut:], spec.val),
        ):
            count = len(pool) if plain else count
            for i in range(count):
                src = data.images[pool[i % len(pool)]] / 16.0
                big = Image.fromarray((src * 255).astype(np.uint8)).resize(
                    (spec.side, spec.side), Image.BICUBIC
                )
                if not plain:
                    s = spec.side
                    angle = rng.uniform(-12, 12)
                    scale = rng.uniform(0.7, 0.95)
                    shift = rng.uniform(-0.08, 0.08, 2) * s
                    big = big.resize((int(s * scale),) * 2, Image.BICUBIC)
                    canvas = Image.new("L", (s, s), 0)
                    off = ((s - big.size[0]) // 2 + int(shift[0]), (s - big.size[1]) // 2)
                    canvas.paste(big, (off[0], off[1] + int(shift[1])))
                    big = canvas.rotate(angle, Image.BILINEAR)
                    big = big.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
                mask = np.asarray(big, np.float32)[..., None] / 255.0
                fg, bg = _ink(rng) if spec.colour else ((255,) * 3, (0,) * 3)
                a = mask * np.array(fg) + (1 - mask) * np.array(bg)
                img = Image.fromarray(a.astype(np.uint8))
                _save(_finish(img, rng, spec.colour), root, split, f"digit_{k}", i)


SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "moon",
    "arrow",
    "bar",
)


def _polygon(name: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The outline of `name` on the unit square centred at 0, before rotation."""
    if name == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if name == "triangle":
        return [(0, -1), (1, 0.8), (-1, 0.8)]
    if name == "hexagon":
        return [(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 7)[:-1]]
    if name == "star":
        return [
            ((1.0 if j % 2 == 0 else 0.4) * np.sin(t), -(1.0 if j % 2 == 0 else 0.4) * np.cos(t))
            for j, t in enumerate(np.linspace(0, 2 * np.pi, 11)[:-1])
        ]
    if name == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    if name == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    if name == "bar":
        return [(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)]
    raise KeyError(name)


def _shape(name: str, side: int, rng: np.random.Generator, colour: bool) -> Image.Image:
    """One shape, 45-85% of the image, anywhere inside it, rotated +-25 deg, on a background
    of the other colour with a faint second shape-free gradient."""
    up = 4  # drawn at 4x and shrunk: antialiased edges
    s = side * up
    fg, bg = _colours(rng, colour)
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.42) * s
    cx, cy = rng.uniform(r, s - r, 2)
    t = np.deg2rad(rng.uniform(-25, 25))
    if name in ("circle", "ring", "moon"):
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=fg)
        if name == "ring":
            q = 0.55 * r
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=bg)
        if name == "moon":
            d = 0.55 * r
            draw.ellipse([cx - r + d * np.cos(t), cy - r + d * np.sin(t),
                          cx + r + d * np.cos(t), cy + r + d * np.sin(t)], fill=bg)  # fmt: skip
    else:
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        pts = np.array(_polygon(name, rng)) @ rot.T * r + (cx, cy)
        draw.polygon([tuple(p) for p in pts], fill=fg)
    return img.resize((side, side), Image.LANCZOS)


def _shapes(spec: SetSpec, root: Path, rng: np.random.Generator) -> None:
    for k, name in enumerate(SHAPES[: spec.classes]):
        for split, count in (("train", spec.train), ("val", spec.val)):
            for i in range(count):
                img = _shape(name, spec.side, rng, spec.colour)
                _save(_finish(img, rng, spec.colour), root, split, f"{k}_{name}", i)


TEXTURES = ("stripes", "checker", "dots", "waves", "blobs", "grid")


def _texture(name: str, side: int, rng: np.random.Generator, colour: bool) -> Image.Image:
    """A texture of kind `name` at a random period (5-14 px), phase and orientation."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    t = rng.uniform(0, np.pi)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    p = rng.uniform(5, 14)
    ph = rng.uniform(0, p, 2)
    if name == "stripes":
        m = ((u + ph[0]) % p) < p / 2
    elif name == "checker":
        m = (((u + ph[0]) // p + (v + ph[1]) // p) % 2) == 0
    elif name == "dots":
        m = (((u + ph[0]) % p - p / 2) ** 2 + ((v + ph[1]) % p - p / 2) ** 2) < (p / 3.2) ** 2
    elif name == "waves":
        m = np.sin(2 * np.pi * (u + 0.25 * p * np.sin(2 * np.pi * v / (2 * p))) / p) > 0
    elif name == "blobs":
        small = rng.normal(size=(max(2, int(side / p)),) * 2)
        up = Image.fromarray(small.astype(np.float32), mode="F").resize((side, side), Image.BICUBIC)
        m = np.asarray(up) > 0
    elif name == "grid":
        w = max(1.0, p / 5)
        m = (((u + ph[0]) % p) < w) | (((v + ph[1]) % p) < w)
    else:
        raise KeyError(name)
    fg, bg = _colours(rng, colour)
    a = np.where(m[..., None], np.array(fg), np.array(bg)).astype(np.uint8)
    return Image.fromarray(a)


def _textures(spec: SetSpec, root: Path, rng: np.random.Generator) -> None:
    for k, name in enumerate(TEXTURES[: spec.classes]):
        for split, count in (("train", spec.train), ("val", spec.val)):
            for i in range(count):
                img = _texture(name, spec.side, rng, spec.colour)
                _save(_finish(img, rng, spec.colour), root, split, f"{k}_{name}", i)


SETS: dict[str, SetSpec] = {
    "digits16": SetSpec(16, False, 10, 0, 0, _digits),  # the originals: ~1,250 / ~540
    "digits28": SetSpec(28, False, 10, 300, 100, _digits),
    "digits48c": SetSpec(48, True, 10, 200, 100, _digits),
    "shapes28": SetSpec(28, False, 10, 300, 100, _shapes),
    "textures64c": SetSpec(64, True, 6, 300, 100, _textures),
    "shapes40c": SetSpec(40, True, 10, 200, 100, _shapes),  # held out of the fitting
}


def make(name: str, root: Path, seed: int = 0) -> Path:
    """Writes set `name` under `root/name` (once: an existing folder is kept)."""
    folder = root / name
    if not (folder / "val").is_dir():
        spec = SETS[name]
        spec.make(spec, folder, np.random.default_rng(seed))
    return folder


def _properties(folder: Path) -> dict:
    from deit.data.survey import survey

    s = survey(str(folder))
    return {k: v for k, v in vars(s).items() if k != "dataset"}


def run_one(name: str, root: Path, runs: Path, flags: list[str]) -> dict:
    folder = make(name, root)
    out = runs / name
    cmd = [sys.executable, "-m", "deit.cli", "train", "--data", str(folder), "--output", str(out)]
    cmd += ["--progress", "lines", *flags]
    print("$", " ".join(cmd), flush=True)
    tick = time.perf_counter()
    log = runs / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - tick
    if code != 0:
        tail = log.read_text().strip().splitlines()
        print("\n".join(tail[-30:]), file=sys.stderr)
        return {"set": name, "error": tail[-1:], "seconds": seconds}
    summary = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    teacher_cfg = out / "teacher" / "config.json"
    t_epochs = None
    if (out / "teacher" / "metrics.jsonl").is_file():
        evals = [
            json.loads(line)
            for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line
        ]
        t_epochs = len(evals)
    s_evals = [
        line for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    return {
        "set": name,
        "held_out": name in HELD_OUT,
        **_properties(folder),
        "colour": SETS[name].colour,
        "val_images": sum(1 for _ in (folder / "val").rglob("*.png")),
        "recipe": config["recipe"],
        "time_budget": config.get("time_budget"),
        "model": config["model"]["name"],
        "img_size": config["data"]["img_size"],
        "teacher": summary.get("teacher", {}).get("top1"),
        "teacher_epochs": t_epochs,
        "teacher_config_epochs": json.loads(teacher_cfg.read_text())["optim"]["epochs"]
        if teacher_cfg.is_file()
        else None,
        "student": summary["val"]["avg"]["top1"],
        "cls": summary["val"]["cls"]["top1"],
        "dist": summary["val"]["dist"]["top1"],
        "ema": summary.get("val_ema", {}).get("avg", {}).get("top1"),
        "student_epochs": len(s_evals),
        "seconds": round(seconds, 1),
    }


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows: list[dict]) -> str:
    head = (
        "| set | images (train / val) | side, channels | classes | model, size | teacher "
        "(ResNet-8) | student (avg heads) | student / teacher | epochs (teacher / student) | "
        "budget | time |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | failed: {r['error']} |" + " |" * 9)
            continue
        name = r["set"] + (" (held out)" if r["held_out"] else "")
        ratio = r["student"] / r["teacher"] if r.get("teacher") else float("nan")
        lines.append(
            f"| {name} | {r['train_images']:,} / {r['val_images']:,} | {r['side']} px, "
            f"{'colour' if r['colour'] else 'grey'} | {r['classes']} | "
            f"{r['model'].removeprefix('deit_')}, {r['img_size']} px | {r['teacher']:.1f}% | "
            f"{r['student']:.1f}% | {ratio:.2f} | {r['teacher_epochs']} / "
            f"{r['student_epochs']} | {r['time_budget']} | {r['seconds'] / 60:.1f} min |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make", help="write the sets' folders")
    m.add_argument("root", type=Path)
    m.add_argument("--sets", nargs="+", default=list(SETS))
    r = sub.add_parser("run", help="write the sets to a temporary folder and train on each")
    r.add_argument("--sets", nargs="+", default=list(SETS))
    r.add_argument("--root", type=Path, default=None, help="reuse written sets (default: temp)")
    r.add_argument("--runs", type=Path, default=None, help="run folders (default: temp)")
    r.add_argument("--name", default="small_suite", help="results file name")
    r.add_argument("--merge", action="store_true", help="replace only these sets' rows")
    r.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="to deit train")
    args = p.parse_args()
    if args.what == "make":
        for name in args.sets:
            print(make(name, args.root))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "sets"
        runs = args.runs or Path(tmp) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.sets:
            rows.append(run_one(name, root, runs, args.flags))
            print(json.dumps(rows[-1]), flush=True)
    cores = len(os.sched_getaffinity(0))
    meta = {
        "cpu": _cpu(),
        "cores": cores,
        "command": "python bench/small_suite.py run [--sets ...] [--flags --time-budget T]",
    }
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / f"{args.name}.json"
    if args.merge and old.is_file():
        kept = [r for r in json.loads(old.read_text())["rows"] if r["set"] not in args.sets]
        rows = sorted(kept + rows, key=lambda r: list(SETS).index(r["set"]))
    (RESULTS / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    text = (
        f"`{meta['command']}` on {meta['cpu']}, {cores} core(s)"
        + (" (`taskset -c 1`)" if cores == 1 else "")
        + "; teacher: the "
        "ResNet-8 the run trains first (the suite's CNN reference); student: the distilled DeiT, "
        "averaged heads; budget: `--time-budget`; time: the whole `deit train`.\n\n" + table(rows)
    )
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
