"""The README's speed table: `deit bench` with its defaults, written to `bench/results/`.

DeiT-Ti and DeiT-S (distilled) inference at 224, batch 1 / 8 / 32 / 64, fp32 and bf16; the hard-
distillation training step of DeiT-Ti with a ResNet-18 teacher at batch 32; the timm reference
(eager, and `torch.compile` at batch 32) interleaved with them in the same run; the XLA matmul
rate; the input pipeline with 0 and 2 workers. Takes ~10 min on 2 cores; run it on a quiet
machine (nothing else busy), since the reference's OpenMP threads suffer most from contention.

    python bench/speed.py            # any `deit bench` flag may follow
"""

from __future__ import annotations

import sys
from pathlib import Path

from deit.cli import main

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(RESULTS / "speed.json")]
    if "--markdown" not in args:
        args += ["--markdown", str(RESULTS / "speed.md")]
    sys.exit(main(["bench", *args]))
