"""The input-pipeline part of `deit bench`: generated JPEGs through `deit.data.train_batches`.

Timed alone, after the side-by-side rounds: the question is whether the host pipeline (decode,
random-resized-crop, flip, RandAugment at 224) delivers the images/s the training step consumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def make_jpeg_folder(root: str | Path, count: int = 64, seed: int = 0) -> list[str]:
    """`count` JPEGs of ImageNet's typical size (500×375 or 375×500, quality 90) under `root`.

    Smooth colour gradients plus noise, so decoding costs about what a photo costs; files that
    already exist are reused.
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = root / f"img_{i:04d}.jpg"
        if not path.exists():
            h, w = (375, 500) if i % 2 == 0 else (500, 375)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            slope = rng.uniform(-0.4, 0.4, (2, 3))
            image = rng.uniform(0, 255, 3) + np.stack([yy, xx], -1) @ slope
            image += rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def measure_pipeline(
    paths: list[str], workers: int, batch: int, batches: int, img_size: int = 224
) -> dict[str, Any]:
    """Images/s of `deit.data.train_batches` (decode, random-resized-crop, flip, RandAugment
    `rand-m9-mstd0.5-inc1`, batching) over `paths`, `batches` batches of `batch`.

    Timed from the iterator's creation, so worker start-up counts against the rate: grain
    prefetches ahead (threads even with 0 workers), which makes "after the first batch" a
    measure of its buffer rather than of the pipeline.
    """
    from deit.data import DataConfig, Source, train_batches

    n = batch * batches
    files = [paths[i % len(paths)] for i in range(n)]
    source = Source(files, np.zeros(n, np.int32), ["0"])
    cfg = DataConfig(dataset="bench", img_size=img_size, workers=workers, repeats=1)
    tick = time.perf_counter()
    it = train_batches(source, cfg, seed=0, global_batch=batch)
    next(it)
    first = time.perf_counter() - tick
    count = batch + sum(len(b["label"]) for b in it)
    seconds = time.perf_counter() - tick
    del it
    return {
        "workers": workers,
        "batch": batch,
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "img_size": img_size,
        "first_batch_s": first,
    }
