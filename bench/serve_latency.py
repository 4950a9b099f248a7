"""Serving latency of an exported DeiT: onnxruntime against `deit.jit`, and against timm's ONNX.

    python bench/serve_latency.py                       # DeiT-Ti distilled at 224, batch 1 and 32
    python bench/serve_latency.py --quick               # fewer, shorter rounds
    python bench/serve_latency.py --out bench/results/serve_latency.json

One set of weights (random: latency does not depend on them, and no download is needed), four
ways of running it on this CPU:

- `deit.jit`: `model.apply` jitted with the package's compiler options, the weights an argument;
- `stablehlo`: the `deit export --format stablehlo` file, deserialised and jitted;
- `onnxruntime`: the `deit export --format onnx` file (jax2onnx) in an onnxruntime CPU session;
- `timm onnx`: the same weights in timm's model (`convert.to_torch`), exported by
  `torch.onnx.export(dynamo=False)` (the TorchScript exporter: it needs the `onnx` package,
  which the `[onnx]` extra brings; torch's default `dynamo=True` exporter also needs
  `onnxscript`), in the same onnxruntime. Left out when torch or timm is missing.

Every case gets the same float32 batch; its logits are compared with `deit.jit`'s (max |Δ| in
the table). The cases alternate within each round, A B C D A B C D, so that a ratio compares
runs made seconds apart; a case's latency is the median over its rounds of the round's median
call, a ratio the median of the per-round ratios. onnxruntime and XLA use `--threads` threads
(default: the cores this process may run on; `taskset -c 0` for one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from speed import _cpu_name

import deit
from deit import convert, export, serving

NCHW = ("timm onnx",)
# The torch side runs in its own process: torch and XLA each size a thread pool to the machine.
TIMM_EXPORT = """
import sys, numpy as np, timm, torch
name, weights, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model = timm.create_model(name, pretrained=False).eval()
model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(weights).items()}, strict=True)
x = torch.zeros(1, 3, size, size)
axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
torch.onnx.export(model, (x,), out, dynamo=False, input_names=["images"],
                  output_names=["logits"], dynamic_axes=axes, opset_version=17)
"""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_distilled_patch16_224")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
    p.add_argument("--min-seconds", type=float, default=None, help="per case and round")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-timm", action="store_true", help="leave out timm's ONNX export")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.min_seconds = args.min_seconds or (0.5 if args.quick else 2.0)
    return args


def ort_session(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]


def timm_onnx(model: Any, params: dict, name: str, folder: Path, threads: int) -> Path | None:
    """timm's ONNX export of `params` (in a torch process), or None without torch/timm."""
    weights = folder / "timm_weights.npz"
    np.savez(weights, **convert.to_torch(params, model))
    out = folder / "timm.onnx"
    cmd = [sys.executable, "-c", TIMM_EXPORT, name, str(weights), str(out)]
    cmd += [str(model.img_size), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"timm onnx left out: {last}", file=sys.stderr)
        return None
    return out


def cases(args: argparse.Namespace, folder: Path) -> tuple[dict[str, Callable], dict[str, Any]]:
    """`{case: call(x) -> logits}` for one set of weights, and what building them took."""
    model = deit.create_model(args.model)
    variables = {"params": deit.init_params(model, 0)}
    export.save_model(folder / "model", model, variables, variant=args.model)
    built: dict[str, Any] = {}
    apply = deit.jit(lambda v, x: model.apply(v, x).logits)
    runs: dict[str, Callable] = {"deit.jit": lambda x: np.asarray(apply(variables, x))}
    for fmt in ("stablehlo", "onnx"):
        start = time.perf_counter()
        done = serving.export_model(folder / "model", fmt, folder / fmt)
        built[f"export {fmt} s"] = round(time.perf_counter() - start, 1)
        built[f"export {fmt} max |Δ|"] = done.max_abs_diff
    hlo = serving.open_artifact(folder / "stablehlo")
    runs["stablehlo"] = hlo
    runs["onnxruntime"] = ort_session(folder / "onnx" / "model.onnx", args.threads)
    if not args.no_timm:
        path = timm_onnx(model, variables["params"], args.model, folder, args.threads)
        if path is not None:
            runs["timm onnx"] = ort_session(path, args.threads)
    return runs, built


def median_call(call: Callable, x: np.ndarray, seconds: float) -> float:
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        runs, built = cases(args, Path(tmp))
        size = deit.get_spec(args.model).img_size
        rows = []
        for b in args.batches:
            x = np.random.default_rng(b).standard_normal((b, size, size, 3)).astype(np.float32)
            # timm's model takes NCHW: its input is transposed once, outside the timing.
            inputs = {
                k: np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if k in NCHW else x for k in runs
            }
            want = runs["deit.jit"](x)
            diffs = {
                k: float(np.max(np.abs(np.asarray(f(inputs[k])) - want))) for k, f in runs.items()
            }
            for k, f in runs.items():  # warm up: compile, allocate
                f(inputs[k])
            per_round: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, f in runs.items():
                    per_round[k].append(median_call(f, inputs[k], args.min_seconds))
            for k, ts in per_round.items():
                ratios = [t / j for t, j in zip(ts, per_round["deit.jit"], strict=True)]
                rows.append(
                    {
                        "batch": b,
                        "case": k,
                        "ms": 1e3 * statistics.median(ts),
                        "ms_rounds": [1e3 * t for t in ts],
                        "vs_deit_jit": statistics.median(ratios),
                        "img_per_s": b / statistics.median(ts),
                        "max_abs_diff": diffs[k],
                    }
                )
    import onnxruntime

    return {
        "model": args.model,
        "cpu": _cpu_name(),
        "threads": args.threads,
        "rounds": args.rounds,
        "min_seconds": args.min_seconds,
        "versions": {"jax": jax.__version__, "onnxruntime": onnxruntime.__version__},
        "export": built,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}, {result['cpu']}, {result['threads']} thread(s), "
        f"{result['rounds']} interleaved rounds",
        "",
        "| batch | case | ms / call | img/s | time vs deit.jit | max abs diff vs deit.jit |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['case']} | {r['ms']:.1f} | {r['img_per_s']:.1f} | "
            f"{r['vs_deit_jit']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = measure(args)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table(result) + "\n")


if __name__ == "__main__":
    main()
