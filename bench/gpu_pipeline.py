"""The input pipeline against the training step: host path (`--data.decode host`) and GPU path
(`--data.decode gpu`) on ImageNet-shaped JPEGs, in img/s (issue 27, items 3-5).

    python bench/gpu_pipeline.py --quick        # CPU, tiny model, < 2 min: the code runs
    python bench/gpu_pipeline.py                # a GPU: DeiT-S⚗ and DeiT-Ti⚗, b256, bf16
    python bench/gpu_pipeline.py --models deit_small_distilled_patch16_224 --images 4096

In one process, per model: the training step is compiled once (no teacher: the student's step,
normalise -> erasing -> mixup/cutmix -> forward/backward -> AdamW, as `deit train` runs it), then
timed on

- **step**: one batch already on the device, over and over (the bare step's rate, the ceiling);
- **host**: the host path's batches (grain workers decode, crop, flip, RandAugment), fed to the
  step as the loop feeds it (`take_bad`, `put_batch`, the step, dispatched asynchronously);
- **gpu**: the GPU path's batches (workers read bytes and draw; nvImageCodec decodes where it is
  installed, else the host decoder; crop, flip, RandAugment on the device), fed the same way;

and each pipeline alone, without the step (**host pipeline**, **gpu pipeline**): what the input
side delivers by itself. Rates are images over the wall time after `--warmup` batches. The
images are `bench/imagenet_like.py`'s (500×375 / 375×500 JPEGs, ~115 KB), generated into a
temporary folder (or `--data`). Writes `bench/results/gpu_pipeline_<device>[_quick].{json,md}`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if (BENCH.parent / "src" / "deit").is_dir():  # this checkout's package, installed or not
    sys.path.insert(0, str(BENCH.parent / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deit  # noqa: E402
from deit import data, parallel  # noqa: E402
from deit.compiler import compiler_options  # noqa: E402
from deit.data import gpu  # noqa: E402

RA = "rand-m9-mstd0.5-inc1"
FULL_MODELS = ("deit_small_distilled_patch16_224", "deit_tiny_distilled_patch16_224")
QUICK_MODEL = "deit_test_distilled_patch4_32"


def _imagenet_like() -> Any:
    spec = importlib.util.spec_from_file_location("imagenet_like", BENCH / "imagenet_like.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagenet_like"] = module
    spec.loader.exec_module(module)
    return module


def _step(model_name: str, batch: int, img_size: int, dtype: str, classes: int) -> tuple:
    """(jitted step, state, a device batch): the student's training step, no teacher."""
    from deit.data.device import ErasingConfig, MixupConfig
    from deit.losses import LossConfig
    from deit.optim import OptimConfig, create_optimizer
    from deit.train_step import StepConfig, init_state, make_train_step

    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
    model = deit.create_model(model_name, dtype=dt, num_classes=classes, img_size=img_size)
    tx, schedule = create_optimizer(OptimConfig(), batch, 1000)
    cfg = StepConfig(
        classes, data.IMAGENET_MEAN, data.IMAGENET_STD, MixupConfig(), ErasingConfig(),
        LossConfig("none"),
    )  # fmt: skip
    state = init_state(model, tx, cfg, 0, (img_size, img_size, 3))
    step = jax.jit(
        make_train_step(model, tx, schedule, cfg),
        donate_argnums=0,
        compiler_options=compiler_options(dt),
    )
    rng = np.random.default_rng(0)
    fixed = {
        "image": rng.integers(0, 256, (batch, img_size, img_size, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, (batch,), dtype=np.int32),
    }
    return step, state, fixed


def _rate(batches: Any, batch: int, warmup: int, steps: int, consume: Any) -> dict[str, float]:
    """img/s of `consume(batch)` over `steps` batches after `warmup`; `consume` returns what to
    wait on (the last one is waited for before the clock stops)."""
    last, tick, seen = None, None, 0
    for k, b in enumerate(batches):
        if k == warmup:
            if last is not None:
                jax.block_until_ready(last)
            tick = time.perf_counter()
        last = consume(b)
        if k >= warmup:
            seen += batch
        if k + 1 >= warmup + steps:
            break
    jax.block_until_ready(last)
    seconds = time.perf_counter() - tick if tick is not None else float("nan")
    return {"img_per_s": seen / seconds, "images": seen, "seconds": seconds}


def measure(args: argparse.Namespace, root: Path, log: Any) -> dict[str, Any]:
    mesh = parallel.make_mesh()
    train, _ = data.image_folder(root)
    classes = len(train.classes)
    rows: list[dict[str, Any]] = []
    decoder = None
    for model_name in args.models:
        step, state, fixed = _step(model_name, args.batch, args.img_size, args.dtype, classes)
        state = {"s": state}

        def train_on(b: dict[str, Any], state: dict = state, step: Any = step) -> Any:
            b = dict(b)
            data.take_bad(b, train, "error")
            b.pop("mask", None)
            state["s"], metrics = step(state["s"], parallel.put_batch(b, mesh))
            return metrics["loss"]

        device_batch = parallel.put_batch(fixed, mesh)
        tick = time.perf_counter()
        state["s"], m = step(state["s"], device_batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - tick

        def bare(_: Any, state: dict = state, step: Any = step, batch: Any = device_batch) -> Any:
            state["s"], metrics = step(state["s"], batch)
            return metrics["loss"]

        needed = args.warmup + args.steps
        row = {"model": model_name, "compile_s": compile_s}
        row["step"] = _rate(iter(range(needed)), args.batch, args.warmup, args.steps, bare)
        log(f"{model_name}: step {row['step']['img_per_s']:.0f} img/s")
        for path in ("host", "gpu"):
            cfg = data.DataConfig(
                dataset=str(root), img_size=args.img_size, randaugment=RA, repeats=1,
                workers=args.workers, decode=path, decode_scaling=True,
            )  # fmt: skip
            epochs = -(-needed * args.batch // len(train)) + 1
            for with_step in (True, False):
                stream = data.train_batches(
                    train, cfg, seed=0, global_batch=args.batch, epochs=epochs
                )
                if path == "gpu" and stream._stage is not None:
                    decoder = stream._stage.decoder.name
                consume = train_on if with_step else (lambda b: b["image"])
                try:
                    result = _rate(stream, args.batch, args.warmup, args.steps, consume)
                finally:
                    stream.close(now=True)
                key = path if with_step else f"{path} pipeline"
                row[key] = result
                log(f"{model_name}: {key} {result['img_per_s']:.0f} img/s")
        rows.append(row)
    return {"rows": rows, "decoder": decoder}


def _device_name() -> str:
    d = jax.devices()[0]
    name = getattr(d, "device_kind", d.platform)
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def report(found: dict[str, Any]) -> str:
    cols = ("step", "host", "gpu", "host pipeline", "gpu pipeline")
    lines = [
        f"# Input pipeline against the training step ({found['device']})",
        "",
        f"`python bench/gpu_pipeline.py{' --quick' if found['quick'] else ''}`: "
        f"{found['images']} ImageNet-shaped JPEGs, batch {found['batch']}, {found['dtype']}, "
        f"img {found['img_size']}, `{RA}`, {found['workers']} worker(s) of "
        f"{found['cores']} usable core(s); GPU path decoder: {found['decoder']}.",
        "",
        "| model | " + " | ".join(f"{c}, img/s" for c in cols) + " | host / step | gpu / step |",
        "|---|" + "---:|" * (len(cols) + 2),
    ]
    for row in found["rows"]:
        rates = [row[c]["img_per_s"] for c in cols]
        ratios = [rates[1] / rates[0], rates[2] / rates[0]]
        cells = [f"{r:,.0f}" for r in rates] + [f"{r:.2f}" for r in ratios]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per worker core, the host path delivers host pipeline / workers img/s; the cores a GPU "
        "needs are the step's rate over that (docs/gpu_input.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized: tiny model, few images")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--images", type=int, default=None, help="training JPEGs to generate")
    parser.add_argument("--data", default=None, help="an ImageFolder to use instead")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: usable cores - 1")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args(argv)
    q = args.quick
    args.models = args.models or ([QUICK_MODEL] if q else list(FULL_MODELS))
    args.images = args.images or (64 if q else 8192)
    args.batch = args.batch or (16 if q else 256)
    args.img_size = args.img_size or (32 if q else 224)
    args.dtype = args.dtype or ("fp32" if q else "bf16")
    args.workers = args.workers if args.workers is not None else max(1, data.usable_cores() - 1)
    args.warmup = args.warmup or (1 if q else 3)
    args.steps = args.steps or (3 if q else 20)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DEIT_HOME", str(Path(tmp) / "home"))
        if args.data:
            root = Path(args.data)
        else:
            root = Path(tmp) / "imagenet_like"
            per_class = -(-args.images // 4)
            _imagenet_like().generate(root, 4, per_class, 1, progress=False)
        found = measure(args, root, log)
    found.update(
        device=_device_name(), quick=q, images=args.images, batch=args.batch, dtype=args.dtype,
        img_size=args.img_size, workers=args.workers, cores=data.usable_cores(),
        jax=jax.__version__, nvimgcodec=gpu.nvimgcodec_available() or "available",
    )  # fmt: skip
    name = f"gpu_pipeline_{found['device']}{'_quick' if q else ''}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(found, indent=2) + "\n")
    text = report(found)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
