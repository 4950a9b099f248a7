"""Probes of the training step's slow parts on XLA:CPU, each timed interleaved in one process.

    python bench/step_probes.py ynn --dtype bfloat16 --settings default INDIVIDUAL_DOT
    python bench/step_probes.py attention       # attention's batched matmuls, GFLOP/s
    python bench/step_probes.py attention-core  # the core's forms: (B, h) batch, flat, chunks
    python bench/step_probes.py wgrad           # bf16 weight gradients, bf16 vs upcast to f32
    python bench/step_probes.py tree-reduction  # XLA's tree reduction of long sums on and off

`ynn` compiles `step_parts` (the ResNet-18 teacher's forward, DeiT-Ti's forward and gradient, batch
32, stochastic depth on), once per YNNPACK fusion-type set (`default`: XLA's; `none`: no YNNPACK;
else `+`-joined `LIBRARY_FUSION_TYPE_` names). Each probe prints its table and writes
`bench/results/step_probes_<probe>_<vendor>.json` (`ynn`: `step_probes_ynn_<dtype>_<vendor>.json`).
The bench's own cases (`bench/levers.py`, `bench/speed.py`) decide what is kept; these say where
the time goes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax import lax
from user_jit import _cpu

from deit.compiler import YNN_FUSION_TYPE, compiler_options, cpu_isa, cpu_vendor
from deit.model import create_model
from deit.teacher import create_teacher

RESULTS = Path(__file__).parent / "results"
TI = "deit_tiny_distilled_patch16_224"
XLA_ONLY = {YNN_FUSION_TYPE: ""}  # no YNNPACK: the package's float32 choice


def _interleaved(fns: dict[str, tuple[Callable, tuple, float]], rounds: int) -> dict[str, float]:
    """Median of `rounds` interleaved rates (work units / s) of each compiled `fn(*args)`,
    whose call does `work` units; the order reverses every round."""
    for fn, args, _ in fns.values():
        jax.block_until_ready(fn(*args))
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            fn, args, work = fns[name]
            calls, tick = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - tick < 0.5:
                jax.block_until_ready(fn(*args))
                calls += 1
            rates[name].append(calls * work / (time.perf_counter() - tick))
    return {k: statistics.median(v) for k, v in rates.items()}


def _write(probe: str, config: dict[str, Any], rows: dict[str, float], unit: str) -> None:
    result = {"cpu": _cpu(), "isa": cpu_isa(), "jax": jax.__version__, "config": config}
    result |= {"unit": unit, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"step_probes_{probe}_{cpu_vendor()}.json").write_text(json.dumps(result, indent=1))
    print(f"{_cpu()} ({cpu_isa()}), jax {jax.__version__}; {unit}")
    for name, value in rows.items():
        print(f"  {name:45s} {value:8.1f}")


def _fusion_option(setting: str) -> dict[str, str] | None:
    if setting == "default":
        return None
    if setting == "none":
        return dict(XLA_ONLY)
    return {YNN_FUSION_TYPE: ",".join(f"LIBRARY_FUSION_TYPE_{t}" for t in setting.split("+"))}


def step_parts(dtype: str) -> dict[str, tuple[Callable, tuple]]:
    """The distillation step's parts at batch 32, uncompiled, each as `(fn, args)`: the
    ResNet-18 teacher's forward, DeiT-Ti's forward, DeiT-Ti's gradient (stochastic depth on)."""
    dt = jnp.dtype(dtype)
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 224, 224, 3))
    teacher = create_teacher("resnet18", 1000, dtype=dt)
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), x[:1])
    model = create_model(TI, dtype=dt, drop_path_rate=0.1)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]

    def loss(p: Any, x: jax.Array) -> jax.Array:
        out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return out.cls_logits.mean() + out.dist_logits.mean()

    return {
        "teacher fwd": (lambda v, x: teacher.apply(v, x), (t_vars, x)),
        "student fwd": (lambda p, x: model.apply({"params": p}, x).logits, (params, x)),
        "student fwd+bwd": (jax.grad(loss), (params, x)),
    }


def ynn(
    dtype: str = "bfloat16",
    settings: tuple[str, ...] = ("default", "INDIVIDUAL_DOT"),
    rounds: int = 4,
) -> None:
    """`step_parts` per YNNPACK fusion-type set (images/s)."""
    parts = step_parts(dtype)
    fns = {}
    for setting in settings:
        options = _fusion_option(setting)
        for part, (fn, args) in parts.items():
            compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
            fns[f"{part} {setting}"] = (compiled, args, 32)
    config = {"dtype": dtype, "settings": list(settings), "rounds": rounds}
    _write(f"ynn_{dtype}", config, _interleaved(fns, rounds), "images/s, batch 32")


def attention(tokens: tuple[int, ...] = (198, 200, 208, 224), rounds: int = 5) -> None:
    """DeiT-Ti's attention matmuls at batch 32 (3 heads of 64), XLA's and YNNPACK's (GFLOP/s):
    the forward's `q·kᵀ` and `p·v` and the backward's `pᵀ·g`, at several token counts."""
    rng = np.random.default_rng(0)
    products = {
        "q.kT": "bhqd,bhkd->bhqk",
        "p.v": "bhqk,bhkd->bhqd",
        "pT.g": "bhqk,bhqd->bhkd",
    }
    fns = {}
    for t in tokens:
        q, k = (jnp.asarray(rng.normal(size=(32, 3, t, 64)), jnp.float32) for _ in range(2))
        p = jnp.asarray(rng.normal(size=(32, 3, t, t)), jnp.float32)
        for name, spec in products.items():
            args = (q, k) if name == "q.kT" else (p, k)
            for kernels, options in (("xla", XLA_ONLY), ("ynn", None)):
                einsum = lambda a, b, spec=spec: jnp.einsum(spec, a, b)
                fn = jax.jit(einsum, compiler_options=options)
                fns[f"T={t} {name} {kernels}"] = (fn, args, 2 * 32 * 3 * t * t * 64 / 1e9)
    _write("attention", {"tokens": list(tokens)}, _interleaved(fns, rounds), "GFLOP/s, float32")


def attention_core(chunks: tuple[int, ...] = (4, 32), rounds: int = 11) -> None:
    """DeiT-Ti's attention core (softmax(q·kᵀ/√d)·v, 3 heads of 64, 198 tokens) forward + backward
    at batch 32, float32 without YNNPACK, in three forms (images/s through one block's core): the
    code's einsums over `(B, h)`, the same over a flattened `(B·h)` batch, and the batch split into
    `chunks` independent cores (smaller batched matmuls XLA's thunk executor may run side by
    side)."""
    b, h, t, d = 32, 3, 198, 64
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.float32) for _ in range(4))

    def core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        s = jnp.einsum("...qd,...kd->...qk", q * d**-0.5, k)
        return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(s, axis=-1), v)

    def flat(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return core(*(x.reshape(b * h, t, d) for x in (q, k, v))).reshape(b, h, t, d)

    def split(n: int) -> Callable:
        def f(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            parts = zip(*(jnp.split(x, n) for x in (q, k, v)), strict=True)
            return jnp.concatenate([core(*p) for p in parts])

        return f

    forms = {"einsums over (B, h)": core, "flattened (B*h)": flat}
    forms |= {f"{n} chunks of the batch": split(n) for n in chunks}
    fns = {}
    for name, form in forms.items():
        grad = jax.grad(lambda q, k, v, f=form: (f(q, k, v) * g).sum(), (0, 1, 2))
        fns[name] = (jax.jit(grad, compiler_options=XLA_ONLY), (q, k, v), b)
    config = {"chunks": list(chunks), "rounds": rounds}
    _write("attention_core", config, _interleaved(fns, rounds), "images/s, fwd+bwd, batch 32")


def wgrad(rounds: int = 5) -> None:
    """DeiT-Ti's Dense shapes at batch 32 (6336 rows): the bf16 forward `x·W`, the bf16 weight
    gradient `xᵀ·g`, and that gradient with x and g upcast to float32, with YNNPACK (the bf16
    program's default) and without (GFLOP/s)."""
    rows = 32 * 198
    rng = np.random.default_rng(0)

    def dot(a: jax.Array, b: jax.Array, contract: tuple) -> jax.Array:
        return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)

    def f32(fn: Callable) -> Callable:
        return lambda a, b: fn(a.astype(jnp.float32), b.astype(jnp.float32))

    def fwd(x: jax.Array, w: jax.Array) -> jax.Array:
        return dot(x, w, ((1,), (0,)))

    def grad(x: jax.Array, g: jax.Array) -> jax.Array:
        return dot(x, g, ((0,), (0,)))

    fns = {}
    for k, n in ((192, 576), (192, 768), (768, 192)):
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
        g = jnp.asarray(rng.normal(size=(rows, n)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=(k, n)), jnp.bfloat16)
        work = 2 * rows * k * n / 1e9
        fns[f"{k}x{n} forward bf16"] = (jax.jit(fwd), (x, w), work)
        fns[f"{k}x{n} wgrad bf16"] = (jax.jit(grad), (x, g), work)
        fns[f"{k}x{n} wgrad f32 ynn"] = (jax.jit(f32(grad)), (x, g), work)
        xla = jax.jit(f32(grad), compiler_options=XLA_ONLY)
        fns[f"{k}x{n} wgrad f32 xla"] = (xla, (x, g), work)
    _write("wgrad", {"rows": rows}, _interleaved(fns, rounds), "GFLOP/s")


def tree_reduction(rounds: int = 4) -> None:
    """DeiT-Ti's gradient (batch 32) with XLA's tree reduction of long sums (the reduce-windows
    the CPU backend emits for every bias and LayerNorm gradient) on and off (images/s), and how
    far the gradients move when it is off (max relative difference over the parameters)."""
    fns, config = {}, {}
    for dtype in ("float32", "bfloat16"):
        grad, args = step_parts(dtype)["student fwd+bwd"]
        base = compiler_options(dtype) or {}
        off = {**base, "xla_disable_hlo_passes": "tree_reduction_rewriter"}
        grads = {}
        for name, options in (("on", base), ("off", off)):
            compiled = jax.jit(grad, compiler_options=options).lower(*args).compile()
            fns[f"{dtype} tree reduction {name}"] = (compiled, args, 32)
            grads[name] = compiled(*args)
        pairs = zip(jax.tree.leaves(grads["on"]), jax.tree.leaves(grads["off"]), strict=True)
        diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12)) for a, b in pairs)
        config[f"{dtype} max relative gradient difference"] = diff
        print(f"{dtype}: gradients with the tree reduction off differ by {diff:.2e} (relative)")
    _write("tree_reduction", config, _interleaved(fns, rounds), "images/s, batch 32")


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict(
        {
            "ynn": ynn,
            "attention": attention,
            "attention-core": attention_core,
            "wgrad": wgrad,
            "tree-reduction": tree_reduction,
        }
    )
