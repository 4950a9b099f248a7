"""Attention by two einsums against `jax.nn.dot_product_attention` (`DEIT_ATTENTION`), DeiT-Ti
inference at batch 32, interleaved in one run; medians of images/s. The model picks the fused
function on GPU only; this is the measurement behind that choice for CPUs. Writes
`bench/results/attention_<vendor>.md` (`deit.compiler.cpu_vendor`).

    python bench/attention.py
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from user_jit import _cpu

import deit
from deit.compiler import cpu_vendor

HERE = Path(__file__).parent


def main(batch: int = 32, rounds: int = 5, calls: int = 3) -> None:
    lines = [
        f"DeiT-Ti distilled, batch {batch}, {_cpu()}, median of {rounds} interleaved rounds",
        "",
        "| dtype | einsums (img/s) | dot_product_attention (img/s) | fused / einsums |",
        "|---|---|---|---|",
    ]
    for dtype in ("float32", "bfloat16"):
        model = deit.create_model("deit_tiny_distilled_patch16_224", dtype=dtype)
        variables = {"params": deit.init_params(model, 0)}
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 3)), jnp.float32)
        fns = {}
        for choice in ("einsum", "xla"):
            os.environ["DEIT_ATTENTION"] = choice  # read while tracing
            fns[choice] = deit.jit(model.apply, dtype=dtype).lower(variables, x).compile()
        del os.environ["DEIT_ATTENTION"]
        rates: dict[str, list[float]] = {c: [] for c in fns}
        for _ in range(rounds):
            for choice, fn in fns.items():
                tick = time.perf_counter()
                for _ in range(calls):
                    fn(variables, x).logits.block_until_ready()
                rates[choice].append(calls * batch / (time.perf_counter() - tick))
        med = {c: statistics.median(r) for c, r in rates.items()}
        ratio = med["xla"] / med["einsum"]
        lines.append(f"| {dtype} | {med['einsum']:.1f} | {med['xla']:.1f} | {ratio:.2f}x |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"attention_{cpu_vendor()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
