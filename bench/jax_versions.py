"""This package on two jax releases side by side: is moving `requires-python` to 3.12 (which
unlocks jax 0.12) worth it?

    python bench/jax_versions.py --pythons .venv/bin/python /tmp/venv312/bin/python

Each `--pythons` entry is the interpreter of a venv with this package installed (editable);
a worker process per entry builds the same cases from `bench/speed.py` (DeiT-Ti/S inference,
the distillation training step, a 2048² matmul), then the driver times them in rounds, one
worker at a time and the order reversed every round, so all share the same noise. A worker
whose jaxlib the package does not tune (`deit.compiler`) also runs with the float32 option
forced (`+ynn-off`), to tell the release from the option. Writes
`bench/results/jax_versions.{json,md}`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

HERE = Path(__file__).resolve().parent
TI, S = "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224"
CASES = (
    ("infer", TI, 32, "float32"),
    ("infer", TI, 32, "bfloat16"),
    ("infer", S, 32, "float32"),
    ("infer", S, 32, "bfloat16"),
    ("train", TI, 32, "float32"),
    ("train", TI, 32, "bfloat16"),
    ("matmul", "2048", 1, "float32"),
    ("matmul", "2048", 1, "bfloat16"),
)


@dataclass(frozen=True)
class Config:
    pythons: tuple[str, ...] = (sys.executable,)
    """Interpreters of venvs that have this package installed."""
    rounds: int = 5
    """Interleaved rounds; the median is reported."""
    min_seconds: float = 2.0
    """Seconds each case runs per round."""
    out: Path = HERE / "results" / "jax_versions.json"
    """JSON results; the markdown table goes beside it."""


def worker(force_ynn_off: bool) -> None:
    """Reads `["run", i, seconds]` lines, answers `[images, seconds]`; builds every case first."""
    sys.path.insert(0, str(HERE))
    import jax
    import jax.numpy as jnp
    import speed

    from deit import compiler

    if force_ynn_off:
        speed.compiler_options = lambda dtype: (
            {compiler.YNN_FUSION_TYPE: ""} if jnp.dtype(dtype) == jnp.float32 else None
        )
    built = []
    for kind, model, batch, dtype in CASES:
        if kind == "infer":
            built.append(speed.inference_case(model, batch, dtype))
        elif kind == "train":
            built.append(speed.train_case(model, batch, dtype))
        else:
            built.append(speed.matmul_case(int(model), dtype))
    tuned = compiler.compiler_options(jnp.float32) is not None or force_ynn_off
    print(json.dumps({"jax": jax.__version__, "fp32_ynn_off": tuned,
                      "compile_s": [c.info["compile_s"] for c in built]}), flush=True)  # fmt: skip
    for line in sys.stdin:
        _, i, seconds = json.loads(line)
        images, elapsed, _ = built[i].run(seconds)
        print(json.dumps([images, elapsed]), flush=True)


def main(cfg: Config) -> None:
    workers = []
    for python in cfg.pythons:
        for force in (False, True):
            if force and workers[-1]["info"]["fp32_ynn_off"]:
                continue  # the package already tunes this jaxlib: nothing to force
            proc = subprocess.Popen(
                [python, __file__, "--worker", "1" if force else "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            info = json.loads(proc.stdout.readline())
            label = f"jax {info['jax']}" + (" +ynn-off" if force else "")
            workers.append({"proc": proc, "info": info, "label": label, "rates": {}})
            print(f"{label}: ready ({python})", flush=True)
    for r in range(cfg.rounds):
        order = workers if r % 2 == 0 else workers[::-1]
        for i in range(len(CASES)):
            for w in order:
                w["proc"].stdin.write(json.dumps(["run", i, cfg.min_seconds]) + "\n")
                w["proc"].stdin.flush()
                images, seconds = json.loads(w["proc"].stdout.readline())
                w["rates"].setdefault(i, []).append(images / seconds)
        print(f"round {r + 1}/{cfg.rounds} done", flush=True)
    for w in workers:
        w["proc"].stdin.close()
        w["proc"].wait()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?")
    rows: list[dict[str, Any]] = []
    for i, (kind, model, batch, dtype) in enumerate(CASES):
        row = {"kind": kind, "model": model, "batch": batch, "dtype": dtype}
        for w in workers:
            row[w["label"]] = statistics.median(w["rates"][i])
        rows.append(row)
    result = {"cpu": cpu, "config": {k: str(v) for k, v in cfg.__dict__.items()}, "rows": rows,
              "workers": [{"label": w["label"], **w["info"]} for w in workers]}  # fmt: skip
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2))
    base = workers[0]["label"]
    head = "| case | " + " | ".join(w["label"] for w in workers) + " |"
    title = f"{cpu}; medians of {cfg.rounds} interleaved rounds; images/s (matmul: calls/s)"
    lines = [f"{title}; ratio to {base} in brackets", "", head, "|---" * (len(workers) + 1) + "|"]
    for row in rows:
        short = row["model"].split("_")[1] if "_" in row["model"] else row["model"]
        name = f"{row['kind']} {short} b{row['batch']} {row['dtype']}"
        cells = [f"{row[w['label']]:.1f} ({row[w['label']] / row[base]:.2f}x)" for w in workers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cfg.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2] == "1")
    else:
        main(tyro.cli(Config))
