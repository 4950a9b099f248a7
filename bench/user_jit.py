"""A user's own `jax.jit(model.apply)` against `deit.jit(model.apply)` (the package's per-dtype
compiler options), interleaved in one run; medians of images/s. Writes
`bench/results/user_jit_<vendor>.{json,md}` (`deit.compiler.cpu_vendor`).

    python bench/user_jit.py --batch 32 --rounds 7
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import deit
from deit.compiler import cpu_vendor

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Config:
    model: str = "deit_tiny_distilled_patch16_224"
    """Registered variant."""
    batch: int = 32
    """Images per call."""
    rounds: int = 7
    """Interleaved rounds (the median is reported)."""
    calls: int = 5
    """Calls per timed block."""


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(cfg: Config) -> None:
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = deit.create_model(cfg.model, dtype=dtype)
        variables = {"params": deit.init_params(model, 0)}
        x = jnp.asarray(np.random.default_rng(0).normal(size=(cfg.batch, 224, 224, 3)), jnp.float32)
        fns = {"jax.jit": jax.jit(model.apply), "deit.jit": deit.jit(model.apply, dtype=dtype)}
        for fn in fns.values():
            fn(variables, x).logits.block_until_ready()  # compile
        rates: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(cfg.rounds):
            for name, fn in fns.items():
                tick = time.perf_counter()
                for _ in range(cfg.calls):
                    fn(variables, x).logits.block_until_ready()
                rates[name].append(cfg.calls * cfg.batch / (time.perf_counter() - tick))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"dtype": dtype, **med, "ratio": med["deit.jit"] / med["jax.jit"]})
    result = {"cpu": _cpu(), "jax": jax.__version__, "config": cfg.__dict__, "rows": rows}
    lines = [
        f"{cfg.model}, batch {cfg.batch}, {_cpu()}, jax {jax.__version__}, median of "
        f"{cfg.rounds} interleaved rounds (images/s)",
        "",
        "| dtype | jax.jit(model.apply) | deit.jit(model.apply) | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['jax.jit']:.1f} | {r['deit.jit']:.1f} | {r['ratio']:.2f}x |"
        for r in rows
    ]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"user_jit_{cpu_vendor()}.json").write_text(json.dumps(result, indent=2))
    (HERE / "results" / f"user_jit_{cpu_vendor()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Config))
