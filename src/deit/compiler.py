"""XLA compiler options per compute dtype, passed to every `jax.jit` of a model.

jaxlib 0.10's CPU backend hands dots, convolutions and reductions to YNNPACK. Measured on the
2-core AVX-512 machine of `bench/` (`python bench/levers.py flags`, DeiT-Ti at 224): YNNPACK's
bfloat16 matmuls accumulating in float32 run at ~900 GFLOP/s against ~330 for XLA's own, so bf16
DeiT needs them; its float32 dots are slower than XLA's own kernels inside the model (DeiT-Ti
inference ~94 -> ~115 img/s at batch 32, ~64 -> ~100 at 64; training step ~1.2x), so float32
programs are compiled without YNNPACK fusions. An `XLA_FLAGS` process flag cannot make that
choice per dtype; a per-executable compiler option can, and leaves other programs alone.

Applies only on the CPU backend of jaxlib 0.10.x (the option is experimental and was measured
there) and only when the user has not chosen YNNPACK fusion types in `XLA_FLAGS` themselves.
`DEIT_XLA_OPTIONS=0` turns it off.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"


# The x86 extensions that decide which kernels XLA:CPU and YNNPACK can use, strongest first.
ISA_LEVELS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@functools.cache
def cpu_isa() -> str:
    """The strongest of `ISA_LEVELS` this CPU has (`/proc/cpuinfo` flags), or "other" (another
    architecture, an older x86, or no `/proc`)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "other"
    return next((isa for isa in ISA_LEVELS if isa in flags), "other")


@functools.cache
def _tuned_backend() -> bool:
    if os.environ.get("DEIT_XLA_OPTIONS", "1") == "0":
        return False
    if YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        if not metadata.version("jaxlib").startswith("0.10."):
            return False
    except metadata.PackageNotFoundError:
        return False
    return jax.default_backend() == "cpu"


def compiler_options(dtype: Any) -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` of a program computing in `dtype`.

    `{"xla_cpu_experimental_ynn_fusion_type": ""}` (no YNNPACK fusions) for float32 programs on
    jaxlib 0.10's CPU backend, else `None` (XLA's defaults).
    """
    if dtype is None or jnp.dtype(dtype) != jnp.float32 or not _tuned_backend():
        return None
    return {YNN_FUSION_TYPE: ""}


def jit(fun: Any, *, dtype: Any = jnp.float32, **jit_kwargs: Any) -> Any:
    """`jax.jit(fun, **jit_kwargs)` with the package's compiler options for `dtype` programs
    (`compiler_options`): what a user's own `jax.jit(model.apply)` lacks.

        forward = deit.jit(model.apply)                 # float32 model
        forward = deit.jit(model.apply, dtype="bfloat16")
    """
    options = compiler_options(dtype)
    if options is not None:
        jit_kwargs["compiler_options"] = {**options, **jit_kwargs.get("compiler_options", {})}
    return jax.jit(fun, **jit_kwargs)
