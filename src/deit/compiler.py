"""XLA compiler options per CPU ISA and compute dtype, passed to every `jax.jit` of a model.

jaxlib 0.10's CPU backend hands dots, convolutions and reductions to YNNPACK. Whether that pays
depends on the dtype, and was measured per ISA level (`cpu_isa`) with `python bench/levers.py
flags` (DeiT-Ti/S at 224, batch 32, interleaved runs; bench/results/levers_flags*.json):

- bfloat16: YNNPACK on (XLA's default) on every level measured. Its bf16 matmuls accumulating in
  float32 are the fast path: without them bf16 DeiT runs at 0.4x on the AMX Intel Xeon
  (levers_flags_intel.json) and ~0.5x on the AMD EPYC (levers_flags.json).
- float32: YNNPACK fusions off. On the AMD EPYC XLA's own float32 kernels are faster inside the
  model (DeiT-Ti inference ~94 -> ~115 img/s at batch 32, ~64 -> ~100 at 64; training step
  ~1.2x); on the AMX Intel Xeon the two are level (0.97-1.06x over inference and the training
  step, levers_flags_intel.json and user_jit_intel.md), so the one choice helps one vendor and costs
  the other nothing. Re-measured on an AMD EPYC Zen 5 (level `avx512_bf16`): DeiT-Ti/S
  inference 1.20x/1.14x, training step 1.27x (levers_flags_amd_zen5.json).
- other architectures (aarch64, x86 without AVX2): not measured; XLA's defaults.
- not kept: YNNPACK for bf16 dots only (its convolutions and reductions left to XLA), on the AMD
  EPYC Zen 5: bf16 inference 0.82-0.85x, training step level (levers_flags_amd_zen5_bf16_dots.json).

oneDNN, also built into jaxlib 0.10's CPU backend (`--xla_cpu_use_onednn=true
--xla_cpu_experimental_onednn_fusion_type=dot`; torch's CPU kernels come from it), is not
used: it kills the process ("partition compile failed", SIGILL) compiling a softmax feeding a
dot, which every attention block has, and aborted once in eight runs of a Dense + GELU
(`python bench/levers.py onednn`, levers_onednn_jaxlib0.10.json, on the AMX Intel Xeon).

An `XLA_FLAGS` process flag cannot make the choice per dtype; a per-executable compiler option
can, and leaves other programs alone. Applies only on the CPU backend of jaxlib 0.10.x (the option
is experimental and was measured there; on jax 0.12, `bench/jax_versions.py`, it moved float32 by
+3-8%, within that run's noise) and only when the user has not chosen YNNPACK fusion types in
`XLA_FLAGS` themselves. `DEIT_XLA_OPTIONS=0` turns it off.
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
def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The strongest of `ISA_LEVELS` this CPU has (the `flags` of `cpuinfo`), or "other" (another
    architecture, an older x86, or no `/proc`)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "other"
    return next((isa for isa in ISA_LEVELS if isa in flags), "other")


# `vendor_id` of /proc/cpuinfo -> the name results files and reports use.
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@functools.cache
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's vendor from the `vendor_id` of `cpuinfo`: "intel", "amd", or "other" (another
    vendor or architecture, or no `/proc`). Benchmarks name their results by it, so both
    vendors' tables stay."""
    try:
        with open(cpuinfo) as f:
            ids = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")), "")
    except OSError:
        return "other"
    return VENDORS.get(ids, "other")


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


# (ISA level, dtype) -> options; what is not here keeps XLA's defaults. The reasons are measured
# (module docstring): the x86 levels share one choice because it was never worse on either vendor.
OPTIONS: dict[tuple[str, str], dict[str, str]] = {
    (isa, "float32"): {YNN_FUSION_TYPE: ""} for isa in ISA_LEVELS
}


def compiler_options(dtype: Any, isa: str | None = None) -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` of a program computing in `dtype` on a
    CPU of ISA level `isa` (default: this machine's, `cpu_isa()`): `OPTIONS`' entry on
    jaxlib 0.10's CPU backend, else `None` (XLA's defaults)."""
    if dtype is None or not _tuned_backend():
        return None
    options = OPTIONS.get((isa or cpu_isa(), jnp.dtype(dtype).name))
    return dict(options) if options else None


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


# A program that compiles faster than this is not worth a file (the digits run's small programs
# compile in ~0.1-1 s on 2 CPU cores; the GPU's training step in tens of seconds).
CACHE_MIN_COMPILE_S = 0.5


def use_compile_cache(folder: str | os.PathLike[str], enabled: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache in `folder` (the CLI passes
    `$DEIT_HOME/jax-cache`), so that a second run of the same shapes loads its compiled programs
    instead of compiling them again (on a GPU, tens of seconds of autotuning). Returns the folder
    in use, or None when off: `enabled=False` or `DEIT_COMPILE_CACHE=0`. A folder the user chose
    already (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is kept. Call before the first compile."""
    if not enabled or os.environ.get("DEIT_COMPILE_CACHE", "1") == "0":
        return None
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return str(chosen)
    jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return os.fspath(folder)
