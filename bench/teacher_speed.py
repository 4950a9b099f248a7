"""The paper's teacher's forward: RegNetY-16GF (`regnety_160`) here against timm's, side by side.

    python bench/teacher_speed.py                 # batch 256 at 224, bf16 and fp32 (a GPU: minutes)
    python bench/teacher_speed.py --quick         # batch 8, shorter rounds (a CPU: ~3 min a core)
    python bench/teacher_speed.py --help

In the distillation step the teacher's forward (about 32 GFLOP per image at 224) costs more
than the DeiT-S student's forward and backward together, so its speed sets the step's. Ours is
timed as the step calls it: `teacher.teacher_logits` (images in [0, 1] -> its normalisation ->
`RegNet` in eval mode -> float32 logits) under one `jax.jit`, bf16 compute with float32
weights. timm's `regnety_160` runs eager under `torch.inference_mode` and `torch.autocast`
(bf16), in a worker process (`timm_worker.py`) that never imports JAX; on a GPU also under
`torch.compile`, channels-last, as timm's own benchmark runs it. Random weights: speed does not
depend on them. Cases alternate A B A B for `--rounds` rounds; a rate is the median of its
rounds. Prints a markdown table; `--out FILE` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from speed import _cpu_name, matmul_flops
from timm_worker import TorchWorker, run_for

from deit.compiler import compiler_options
from deit.teacher import Teacher, create_teacher, teacher_logits
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

MODEL = "regnety_160"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 256 (--quick: 8)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 2)")
    p.add_argument("--min-seconds", type=float, default=None, help="per case and round")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--quick", action="store_true", help="a CPU: batch 8, shorter rounds")
    p.add_argument("--no-timm", action="store_true", help="ours only")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.min_seconds = args.min_seconds or (3.0 if args.quick else 10.0)
    return args


def ours(batch: int, size: int, dtype: str) -> tuple[Any, dict[str, float]]:
    """`call() -> images` of our teacher's jitted forward, and its compile / first-call times
    and FLOPs per image (2 per multiply-add of its convs and matmuls)."""
    model = create_teacher(MODEL, 1000, dtype=jnp.dtype(dtype))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    teacher = Teacher.from_resnet(model, variables, IMAGENET_MEAN, IMAGENET_STD)
    images = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3))
    tick = time.perf_counter()
    step = jax.jit(teacher_logits, compiler_options=compiler_options(jnp.dtype(dtype)))
    compiled = step.lower(teacher, images).compile()
    compile_s = time.perf_counter() - tick
    tick = time.perf_counter()
    compiled(teacher, images).block_until_ready()
    first_s = time.perf_counter() - tick

    def call() -> int:
        compiled(teacher, images).block_until_ready()
        return batch

    flops = matmul_flops(teacher_logits, teacher, images[:1])
    return call, {"compile_s": compile_s, "first_call_s": first_s, "flops_per_image": flops}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    gpu = jax.default_backend() == "gpu"
    cases: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for dtype in args.dtypes:
        key = f"deit {dtype}"
        cases[key], setup[key] = ours(args.batch, args.img_size, dtype)
    worker = None
    if not args.no_timm:
        worker = TorchWorker(args.threads)
        spec = {"kind": "infer", "model": MODEL, "batch": args.batch, "num_classes": 1000}
        spec |= {"img_size": args.img_size, "device": "cuda" if gpu else "cpu"}
        for dtype in args.dtypes:
            for compiled in (False, True) if gpu else (False,):
                key = f"timm{' compile' if compiled else ''} {dtype}"
                run = spec | {"dtype": dtype, "compile": compiled, "channels_last": gpu}
                setup[key] = worker.call("setup", key, run, timeout=1800)
                cases[key] = key
    rates: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for key in order:
                if isinstance(cases[key], str):
                    op = "run_gpu" if gpu else "run"
                    images, seconds, _ = worker.call(op, key, args.min_seconds, timeout=1800)
                else:
                    images, seconds, _ = run_for(cases[key], args.min_seconds)
                rates[key].append(images / seconds)
    finally:
        if worker is not None:
            worker.close()
    result = {
        "model": MODEL,
        "gflop_per_image": setup[f"deit {args.dtypes[0]}"]["flops_per_image"] / 1e9,
        "batch": args.batch,
        "img_size": args.img_size,
        "device": jax.devices()[0].device_kind if gpu else _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "rates": {k: statistics.median(v) for k, v in rates.items()},
        "rounds": rates,
        "setup": setup,
    }
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def table(result: dict[str, Any]) -> str:
    """The markdown table: img/s, TFLOP/s and the ratio to timm eager of the same dtype."""
    lines = [
        f"{result['model']} forward ({result['gflop_per_image']:.1f} GFLOP/image), batch "
        f"{result['batch']} at {result['img_size']}, "
        f"{result['device']} ({result['cores']} core(s), torch threads {result['threads']})",
        "",
        "| implementation | dtype | img/s | TFLOP/s | vs timm eager |",
        "|---|---|---:|---:|---:|",
    ]
    for key, rate in result["rates"].items():
        impl, dtype = key.rsplit(" ", 1)
        eager = result["rates"].get(f"timm {dtype}")
        ratio = f"{rate / eager:.2f}x" if eager else "-"
        tflops = rate * result["gflop_per_image"] / 1e3
        lines.append(f"| {impl} | {dtype} | {rate:.1f} | {tflops:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
