"""Speed levers tried for `bench/speed.py`, each measured A B A B against the current code.

    python bench/levers.py flags      # XLA CPU flags, one child process per setting, alternated
    python bench/levers.py attention  # attention formulations (fp32 and bf16), in one process
    python bench/levers.py bf16       # bf16 matmuls accumulating in f32 vs plain bf16
    python bench/levers.py donate     # training step with and without the state donated
    python bench/levers.py scan       # compile time and speed of the blocks under nn.scan
    python bench/levers.py patch      # patch embedding: strided conv vs reshape + matmul
    python bench/levers.py bias-grad  # Dense bias gradients: reduction vs ones-vector matmul
    python bench/levers.py wgrad-chunks  # fp32 weight gradients summed over row chunks (VJP)
    python bench/levers.py onednn     # oneDNN's dot fusion: which of DeiT's programs it runs
    python bench/levers.py gelu       # bf16 GELU computed in bf16 vs in float32
    python bench/levers.py step       # the training step's parts: teacher, forward, backward
    python bench/levers.py remat      # training step speed and XLA memory with nn.remat blocks

Variants are swapped into `deit.layers` by name only while a case is traced and compiled; the
compiled executables are then timed interleaved with `speed.measure`. Results print as a
table and go to `bench/results/levers_<name>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import speed
from flax import linen as nn
from jax import lax
from speed import Case, _compiled_case, inference_case, train_case

from deit import layers
from deit.compiler import cpu_isa
from deit.model import create_model, flops_per_image

RESULTS = Path(__file__).parent / "results"
TI, S = "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224"
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution,-reduce"
FLAGS = {
    "default": "",
    "deit": "",
    "ynn-off": YNN_OFF,
    "ynn-no-reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "ynn-no-reduce-conv": "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution",
    "ynn-off+vw512": YNN_OFF + " --xla_cpu_prefer_vector_width=512",
    "deit+vw512": "--xla_cpu_prefer_vector_width=512",
    # YNNPACK for dots only (float32 too), its convolutions and reductions left to XLA: a bf16
    # candidate, measured on the AMD EPYC (levers_flags_amd_zen5_bf16_dots.json) and not kept.
    "ynn-dots": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
}


# ---------------------------------------------------------------------------------------------
# Attention and matmul variants


class _AttentionVariant(nn.Module):
    """`deit.layers.Attention`'s fields and projections around a swappable `attend` core."""

    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Any = jnp.float32
    capture: bool = False
    f32acc: bool = False  # matmuls accumulate in float32 (off: in the compute dtype)

    def attend(self, qkv: jax.Array) -> jax.Array:
        """`(B, T, 3, heads, d)` -> `(B, T, heads, d)`."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        qkv = layers.dense(3 * d, "qkv", self.dtype)(x.reshape(b * t, d))
        out = self.attend(qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads))
        return layers.dense(d, "proj", self.dtype)(out.reshape(b * t, d)).reshape(b, t, d)


class HeadsFirst(_AttentionVariant):
    """The code's layout (one transpose to `(3, B, h, T, d)`), f32 accumulation optional."""

    def attend(self, qkv: jax.Array) -> jax.Array:
        acc = jnp.float32 if self.f32acc else None
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        logits = jnp.einsum(
            "bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=acc
        )
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v, preferred_element_type=acc)
        return out.astype(v.dtype).transpose(0, 2, 1, 3)


class TokensFirst(_AttentionVariant):
    """The previous layout: einsums over `(B, T, h, d)` slices of qkv, no transpose."""

    def attend(self, qkv: jax.Array) -> jax.Array:
        acc = jnp.float32 if self.f32acc else None
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum(
            "bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=acc
        )
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=acc).astype(v.dtype)


class JaxDPA(_AttentionVariant):
    """`jax.nn.dot_product_attention` (XLA implementation) on `(B, T, h, d)`."""

    def attend(self, qkv: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


@contextlib.contextmanager
def swapped(**names: Any) -> Iterator[None]:
    """Temporarily replace attributes of `deit.layers` (looked up when a model is traced)."""
    old = {k: getattr(layers, k) for k in names}
    for k, v in names.items():
        setattr(layers, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(layers, k, v)


def _variant_case(label: str, name: str, batch: int, dtype: str, **swap: Any) -> Case:
    with swapped(**swap):
        case = inference_case(name, batch, dtype)
    case.impl = label
    return case


# ---------------------------------------------------------------------------------------------
# Levers


def lever_attention(batches: tuple[int, ...], rounds: int) -> list[Case]:
    variants = {
        "heads-first": {},  # deit.layers.Attention
        "tokens-first": {"Attention": functools.partial(TokensFirst, f32acc=True)},
        "jax-dpa": {"Attention": JaxDPA},
    }
    cases = []
    for name in (TI, S):
        for batch in batches:
            for dtype in ("float32", "bfloat16"):
                for label, swap in variants.items():
                    cases.append(_variant_case(label, name, batch, dtype, **swap))
    speed.measure(cases, rounds, 0.5, print)
    return cases


def lever_bf16(batches: tuple[int, ...], rounds: int) -> list[Case]:
    plain = {"Attention": HeadsFirst, "_low_precision": lambda dtype: False}
    cases = []
    for name in (TI, S):
        for batch in batches:
            cases.append(_variant_case("bf16 plain", name, batch, "bfloat16", **plain))
            cases.append(_variant_case("bf16 f32-acc", name, batch, "bfloat16"))
            cases.append(_variant_case("fp32", name, batch, "float32"))
    speed.measure(cases, rounds, 0.5, print)
    return cases


def lever_donate(batches: tuple[int, ...], rounds: int) -> list[Case]:
    cases = []
    for donate in (True, False):
        case = train_case(TI, 32, "float32", donate=donate)
        case.impl = f"donate={donate}"
        cases.append(case)
    speed.measure(cases, rounds, 2.0, print)
    return cases


class ScanEncoder(nn.Module):
    """DeiT-Ti's 12 blocks as one `nn.scan` over stacked parameters (no stochastic depth)."""

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def body(block: layers.Block, carry: jax.Array, _: None) -> tuple[jax.Array, None]:
            return block(carry), None

        scan = nn.scan(
            body, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth
        )
        block = layers.Block(self.num_heads, self.mlp_dim, dtype=self.dtype, name="blocks")
        return scan(block, x, None)[0]


def lever_scan(batches: tuple[int, ...], rounds: int) -> list[Case]:
    cases = []
    for batch in batches:
        model = create_model(TI)
        t = model.grid[0] * model.grid[1] + 2
        x = jnp.ones((batch, t, model.embed_dim))
        for label, module in (
            ("blocks unrolled", _Unrolled(model.depth, model.num_heads, model.mlp_dim)),
            ("blocks nn.scan", ScanEncoder(model.depth, model.num_heads, model.mlp_dim)),
        ):
            params = jax.jit(module.init)(jax.random.PRNGKey(0), x)
            case = Case("encoder", label, TI, batch, "float32", float(flops_per_image(model)))
            cases.append(_compiled_case(case, jax.jit(module.apply), (params, x), lambda o: None))
    speed.measure(cases, rounds, 0.5, print)
    return cases


class _Unrolled(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = layers.Block(self.num_heads, self.mlp_dim, name=f"blocks_{i}")(x)
        return x


class PatchMatmul(nn.Module):
    """`deit.layers.PatchEmbed` as reshape -> transpose -> one matmul; same `proj` parameters."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, d = self.patch_size, self.embed_dim
        b, h, w, c = x.shape
        kernel, bias = _ConvParams(p, c, d, name="proj")()
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        y = jnp.dot(
            x, kernel.reshape(p * p * c, d).astype(self.dtype), preferred_element_type=jnp.float32
        )
        return (y + bias).astype(self.dtype)


class _ConvParams(nn.Module):
    """The parameters `nn.Conv` would create for the patch projection (same names and init)."""

    patch_size: int
    in_chans: int
    embed_dim: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        p = self.patch_size
        shape = (p, p, self.in_chans, self.embed_dim)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.embed_dim,), jnp.float32)
        return kernel, bias


@jax.custom_vjp
def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias


def _add_bias_fwd(y: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return y + bias, None


def _add_bias_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = g.reshape(-1, g.shape[-1])
    ones = jnp.ones((rows.shape[0],), g.dtype)
    return g, jnp.dot(ones, rows, preferred_element_type=jnp.float32)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class DotBiasDense(nn.Module):
    """`deit.layers.dense` whose bias gradient is a ones-vector matmul instead of a reduction."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", layers.dense_init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(
            x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32
        )
        return _add_bias(y, bias).astype(self.dtype)


def lever_patch(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """Patch embedding as a strided convolution (the code) or reshape + matmul."""
    from deit import model as model_lib

    cases = []
    for label, module in (("conv", model_lib.PatchEmbed), ("reshape+matmul", PatchMatmul)):
        old = model_lib.PatchEmbed
        model_lib.PatchEmbed = module
        try:
            for batch in batches:
                for dtype in ("float32", "bfloat16"):
                    case = inference_case(TI, batch, dtype)
                    case.impl = label
                    cases.append(case)
            for dtype in ("float32", "bfloat16"):
                case = train_case(TI, 32, dtype)
                case.impl = label
                cases.append(case)
        finally:
            model_lib.PatchEmbed = old
    speed.measure(cases, rounds, 2.0, print)
    return cases


def _gelu_in_dtype(x: jax.Array) -> jax.Array:
    """Exact GELU in the input's dtype (the code before GELU was computed in float32)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 2.0**-0.5))


def lever_gelu(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """bf16 GELU computed in bf16 or in float32 (the code): inference and the training step."""
    cases = []
    for label, swap in (("gelu float32", {}), ("gelu bf16", {"gelu": _gelu_in_dtype})):
        with swapped(**swap):
            for batch in batches:
                cases.append(inference_case(TI, batch, "bfloat16"))
                cases[-1].impl = label
            cases.append(train_case(TI, 32, "bfloat16"))
            cases[-1].impl = label
    speed.measure(cases, rounds, 1.0, print)
    return cases


def lever_bias_grad(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """Training step with Dense bias gradients as reductions (the code) or ones-vector matmuls."""
    dot_bias = {"dense": lambda features, name, dtype: DotBiasDense(features, dtype, name=name)}
    cases = []
    for dtype in ("float32", "bfloat16"):
        for label, swap in (("reduce", {}), ("ones-matmul", dot_bias)):
            with swapped(**swap):
                case = train_case(TI, 32, dtype)
            case.impl = label
            cases.append(case)
    speed.measure(cases, rounds, 2.0, print)
    return cases


def _chunked_matmul(chunks: int) -> Callable[..., jax.Array]:
    """`x @ w` for `(N, D)` x whose VJP sums the weight gradient over `chunks` row chunks."""

    @jax.custom_vjp
    def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return x @ w

    def backward(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, w = res
        n = x.shape[0]
        if n % chunks:
            return g @ w.T, x.T @ g
        xc = x.reshape(chunks, n // chunks, x.shape[1])
        gc = g.reshape(chunks, n // chunks, g.shape[1])
        return g @ w.T, jnp.einsum("cni,cno->io", xc, gc)

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), backward)
    return matmul


def _chunked_dense(chunks: int) -> Callable[..., nn.Dense]:
    matmul = _chunked_matmul(chunks)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if lhs.ndim == rhs.ndim == 2 and tuple(map(tuple, dimension_numbers[0])) == ((1,), (0,)):
            return matmul(lhs, rhs)
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)

    return lambda features, name, dtype: nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.dense_init,
        dot_general=dot_general,
        name=name,
    )


def lever_wgrad_chunks(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """float32 training step with every Dense's weight gradient summed over 1, 4 or 8 row chunks
    (a custom VJP, `bench/wgrad.py`'s `chunkC` layout) against autodiff's."""
    x, w = (
        jax.random.normal(jax.random.key(0), (64, 24)),
        jax.random.normal(jax.random.key(1), (24, 8)),
    )
    loss = lambda mm: jax.grad(lambda x, w: jnp.tanh(mm(x, w)).sum(), argnums=(0, 1))(x, w)
    for got, want in zip(loss(_chunked_matmul(4)), loss(jnp.matmul), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cases = []
    for label, swap in [("autodiff", {})] + [
        (f"chunk{c}", {"dense": _chunked_dense(c)}) for c in (1, 4, 8)
    ]:
        with swapped(**swap):
            case = train_case(TI, 32, "float32")
        case.impl = label
        cases.append(case)
    speed.measure(cases, rounds, 2.0, print)
    return cases


def _step_parts(dtype: str) -> list[Case]:
    from step_probes import step_parts

    from deit.compiler import compiler_options

    parts = step_parts(dtype)
    cases = []
    for label, (fn, args) in parts.items():
        case = Case("part", label, TI, 32, dtype, 0.0)
        jitted = jax.jit(fn, compiler_options=compiler_options(speed.DTYPES[dtype]))
        cases.append(_compiled_case(case, jitted, args, lambda o: None))
    case = train_case(TI, 32, dtype)
    case.impl = "whole step"
    return [*cases, case]


def lever_remat(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """Training step with every block's activations kept (the default) or recomputed."""
    cases = []
    for name, batch in ((TI, 32), (TI, 128), (S, 64)):
        for remat in (False, True):
            case = train_case(name, batch, "float32", remat=remat)
            case.impl = f"remat={remat}"
            cases.append(case)
    speed.measure(cases, rounds, 2.0, print)
    return cases


def lever_step(batches: tuple[int, ...], rounds: int) -> list[Case]:
    """Where DeiT-Ti's distillation step (batch 32) spends its time: the teacher's forward, the
    student's forward, the student's forward + backward (stochastic depth on), the whole step."""
    cases = _step_parts("float32") + _step_parts("bfloat16")
    speed.measure(cases, rounds, 2.0, print)
    return cases


# oneDNN (built into jaxlib's CPU backend) for the dots XLA would run itself (float32 ones, and
# bf16 ones it upcasts; bf16 dots accumulating in float32 stay with YNNPACK). `lever_onednn`
# compiles and runs each probe in a child process under these flags and records whether it lives.
ONEDNN = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
ONEDNN_PROBES = ("dense", "dense-gelu", "dense-grad", "attn-qk", "attn-pv", "attn-softmax-pv")


def _probe(name: str) -> None:
    """One DeiT-Ti-shaped float32 program (batch 8, 198 tokens), compiled with YNNPACK off as
    `deit.compiler` does for float32, and run once."""
    x, w, q = jnp.ones((8, 198, 192)), jnp.ones((192, 576)), jnp.ones((8, 3, 198, 64))
    scores = lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)
    probes = {
        "dense": (lambda x, w: x @ w, (x, w)),
        "dense-gelu": (lambda x, w: jax.nn.gelu(x @ w + 1.0), (x, w)),
        "dense-grad": (jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=1), (x, w)),
        "attn-qk": (scores, (q, q)),
        "attn-pv": (lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v), (scores(q, q), q)),
        "attn-softmax-pv": (
            lambda q, v: jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores(q, q), -1), v),
            (q, q),
        ),
    }
    fun, args = probes[name]
    options = {"xla_cpu_experimental_ynn_fusion_type": ""}
    jax.block_until_ready(jax.jit(fun, compiler_options=options)(*args))


def lever_onednn(batches: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    """Which of `ONEDNN_PROBES` oneDNN compiles and runs, each `rounds` times (exit codes; the
    last output line of the first failure)."""
    rows = []
    for name in ONEDNN_PROBES:
        env = dict(os.environ, XLA_FLAGS=ONEDNN)
        args = [sys.executable, __file__, "_probe", "--probe", name]
        codes, failure = [], ""
        for _ in range(rounds):
            proc = subprocess.run(args, env=env, capture_output=True, text=True)
            codes.append(proc.returncode)
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "@ " not in ln]
            if proc.returncode and not failure:
                failure = (lines[-1:] or [""])[0][:200]
        rows.append({"probe": name, "returncodes": codes, "failure": failure})
        print(f"{name:16} exits {codes}  {failure[:80]}", flush=True)
    return rows


def _child_flags(batches: tuple[int, ...], rounds: int) -> list[Case]:
    cases = [speed.matmul_case()]
    for name in (TI, S):
        for batch in batches:
            for dtype in ("float32", "bfloat16"):
                cases.append(inference_case(name, batch, dtype))
    cases += [train_case(TI, 32, "float32"), train_case(TI, 32, "bfloat16")]
    speed.measure(cases, rounds, 0.5, lambda _: None)
    return cases


def lever_flags(
    batches: tuple[int, ...], rounds: int, settings: tuple[str, ...] = tuple(FLAGS)
) -> list[dict[str, Any]]:
    """One child per flag setting and repetition, alternated: A B C A B C ..."""
    out: dict[str, dict[str, list[float]]] = {k: {} for k in settings}
    compile_s: dict[str, dict[str, list[float]]] = {k: {} for k in settings}
    for rep in range(rounds):
        for label in settings:
            flags = FLAGS[label]
            # "deit*": the flags plus `deit.compiler`'s per-dtype options; others: flags only.
            tuned = str(int(label.startswith("deit")))
            env = dict(os.environ, XLA_FLAGS=flags, DEIT_XLA_OPTIONS=tuned)
            args = [sys.executable, __file__, "_child_flags", "--rounds", "2", "--batches"]
            args += [str(b) for b in batches]
            proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
            for case in json.loads(proc.stdout.splitlines()[-1]):
                key = f"{case['kind']} {case['model']} b{case['batch']} {case['dtype']}"
                out[label].setdefault(key, []).append(case["images_per_s"])
                compile_s[label].setdefault(key, []).append(case["info"]["compile_s"])
            print(f"rep {rep + 1} {label} done", flush=True)
    rows = []
    for key in out[settings[0]]:
        row: dict[str, Any] = {"case": key}
        for label in settings:
            row[label] = float(np.median(out[label][key]))
            row[f"{label} rates"] = out[label][key]
            row[f"{label} compile_s"] = float(np.median(compile_s[label][key]))
        rows.append(row)
        print(" | ".join([key] + [f"{label} {row[label]:.3g}" for label in settings]))
    return rows


LEVERS = {
    "attention": lever_attention,
    "bf16": lever_bf16,
    "donate": lever_donate,
    "scan": lever_scan,
    "patch": lever_patch,
    "bias-grad": lever_bias_grad,
    "wgrad-chunks": lever_wgrad_chunks,
    "gelu": lever_gelu,
    "step": lever_step,
    "remat": lever_remat,
    "flags": lever_flags,
    "_child_flags": _child_flags,
    "onednn": lever_onednn,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lever", choices=[*sorted(LEVERS), "_probe"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=sorted(FLAGS), default=list(FLAGS))
    parser.add_argument("--probe", choices=ONEDNN_PROBES, help="(internal) one onednn probe")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    tick = time.perf_counter()
    if args.lever == "_probe":
        _probe(args.probe)
        print(f"{args.probe} ran")
        return
    if args.lever == "flags":
        result = lever_flags(tuple(args.batches), args.rounds, tuple(args.settings))
    else:
        result = LEVERS[args.lever](tuple(args.batches), args.rounds)
    if args.lever == "_child_flags":
        print(json.dumps([c.to_json() for c in result]))
        return
    if result and isinstance(result[0], Case):
        for c in result:
            info = c.info.get("compile_s", 0.0)
            print(f"{c.impl:16} {c.model:34} b{c.batch:<3} {c.dtype:9} {c.rate:9.3g} img/s  "
                  f"compile {info:5.1f} s")  # fmt: skip
        result = [c.to_json() for c in result]
    RESULTS.mkdir(exist_ok=True)
    payload = {"lever": args.lever, "args": vars(args), "results": result}
    payload["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    payload["cpu"] = speed._cpu_name()
    payload["isa"] = cpu_isa()
    payload["seconds"] = time.perf_counter() - tick
    name = f"levers_{args.lever}{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
