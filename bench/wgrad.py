"""The weight-gradient matmul of a Dense layer, `dW = x.T @ g` (contracting over the B·T rows),
in every layout a custom VJP could choose, against the forward-shaped `x @ W` of the same size:
does any layout run the backward's matmuls at the forward's rate on XLA:CPU?

    python bench/wgrad.py            # DeiT-Ti/S Dense shapes at batch 32, fp32 and bf16

Layouts: `xT.g` (what XLA emits for the VJP: dot_general contracting dim 0 of both), `mat(xT)@g`
(x.T materialised first, then a plain matmul), `(mat(gT)@x)T`, `(gT.x)T`, and `chunkC` (the rows
split into C chunks, a batched matmul per chunk, then summed). float32 programs use the package's
float32 options (`deit.compiler`), bf16 ones accumulate in float32. GFLOP/s, medians of 5 blocks.
Writes bench/results/wgrad.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deit.compiler import compiler_options, cpu_isa

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 32 * 198  # batch 32 of DeiT at 224: 196 patches + 2 tokens
SHAPES = ((192, 576), (192, 768), (768, 192), (384, 1152), (384, 1536), (1536, 384))


def _seconds(fn, *args, calls: int = 5, rounds: int = 5) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(rounds):
        tick = time.perf_counter()
        for _ in range(calls):
            fn(*args).block_until_ready()
        times.append((time.perf_counter() - tick) / calls)
    return statistics.median(times)


def _dot(a, b, contract, batch=((), ())):
    return lax.dot_general(a, b, (contract, batch), preferred_element_type=jnp.float32)


def layouts(k: int, n: int) -> dict:
    def chunked(c: int):
        def f(x, g):
            xc, gc = x.reshape(c, ROWS // c, k), g.reshape(c, ROWS // c, n)
            return _dot(xc, gc, ((1,), (1,)), ((0,), (0,))).sum(0)

        return f

    barrier = lax.optimization_barrier  # keeps XLA from folding the transpose into the dot
    return {
        "xT.g": lambda x, g: _dot(x, g, ((0,), (0,))),
        "mat(xT)@g": lambda x, g: _dot(barrier(x.T), g, ((1,), (0,))),
        "(mat(gT)@x)T": lambda x, g: _dot(barrier(g.T), x, ((1,), (0,))).T,
        "(gT.x)T": lambda x, g: _dot(g, x, ((0,), (0,))).T,
        **{f"chunk{c}": chunked(c) for c in (4, 8, 16, 32)},
    }


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "bfloat16"):
        options = compiler_options(dtype)
        for k, n in SHAPES:
            x = jnp.asarray(rng.normal(size=(ROWS, k)), dtype)
            g = jnp.asarray(rng.normal(size=(ROWS, n)), dtype)
            w = jnp.asarray(rng.normal(size=(k, n)), dtype)
            flop = 2 * ROWS * k * n / 1e9
            row = {"dtype": dtype, "in": k, "out": n}
            fwd = jax.jit(lambda x, w: _dot(x, w, ((1,), (0,))), compiler_options=options)
            row["forward x@W"] = flop / _seconds(fwd, x, w)
            for name, fn in layouts(k, n).items():
                row[name] = flop / _seconds(jax.jit(fn, compiler_options=options), x, g)
            rows.append(row)
            print({key: round(v) if isinstance(v, float) else v for key, v in row.items()})
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?")
    names = [key for key in rows[0] if key not in ("dtype", "in", "out")]
    lines = [f"{cpu} ({cpu_isa()}), jax {jax.__version__}; GFLOP/s of (6336 x in)^T (6336 x out)",
             "", "| dtype | in | out | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row[key]:.0f}" for key in names)
        lines.append(f"| {row['dtype']} | {row['in']} | {row['out']} | {cells} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wgrad.json").write_text(json.dumps({"cpu": cpu, "isa": cpu_isa(), "rows": rows}))
    (RESULTS / "wgrad.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
