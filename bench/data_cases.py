"""The input-pipeline benchmark's cases (run by `bench/data.py`): each pipeline as code for a
fresh interpreter, the harness that times it there, and `run_case`, which starts one and reads
back its result (with the CPU time other processes took meanwhile)."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
        return {**result, "error": exception_line(err, proc.returncode), "stderr": err[-4000:]}
    result.update(json.loads(lines[-1][len("RESULT ") :]))
    where = result.get("deit")
    if src is not None and where and not Path(where).resolve().is_relative_to(src.resolve()):
        result["error"] = f"imported deit from {where}, expected it under {src}"
    return result


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def exception_line(stderr: str, returncode: int) -> str:
    """The last exception line of a traceback (not a warning printed after it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    found = [line for line in lines if EXCEPTION_LINE.match(line)]
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
