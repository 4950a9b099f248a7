"""Speed levers tried for `deit bench`, each measured A B A B against the current code.

    python bench/levers.py flags      # XLA CPU flags, one child process per setting, alternated
    python bench/levers.py attention  # attention formulations (fp32 and bf16), in one process
    python bench/levers.py bf16       # bf16 matmuls accumulating in f32 vs plain bf16
    python bench/levers.py donate     # training step with and without the state donated
    python bench/levers.py scan       # compile time and speed of the blocks under nn.scan

Variants are swapped into `deit.layers` by name only while a case is traced and compiled; the
compiled executables are then timed interleaved with `deit.bench.measure`. Results print as a
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deit import bench, layers
from deit.bench import Case, _compiled_case, inference_case, train_case
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
}


# ---------------------------------------------------------------------------------------------
# Attention and matmul variants


class HeadsFirst(nn.Module):
    """`deit.layers.Attention` with the float32 accumulation optional (off by default)."""

    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Any = jnp.float32
    capture: bool = False
    f32acc: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.num_heads
        acc = jnp.float32 if self.f32acc else None
        qkv = layers.dense(3 * d, "qkv", self.dtype)(x)
        q, k, v = qkv.reshape(b, t, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * hd**-0.5, k, preferred_element_type=acc)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v, preferred_element_type=acc)
        out = out.astype(v.dtype).transpose(0, 2, 1, 3).reshape(b, t, d)
        return layers.dense(d, "proj", self.dtype)(out)


class TokensFirst(nn.Module):
    """The previous layout: einsums over `(B, T, h, d)` slices of qkv, no transpose."""

    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Any = jnp.float32
    capture: bool = False
    f32acc: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.num_heads
        acc = jnp.float32 if self.f32acc else None
        qkv = layers.dense(3 * d, "qkv", self.dtype)(x).reshape(b, t, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k, preferred_element_type=acc)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=acc)
        return layers.dense(d, "proj", self.dtype)(out.astype(v.dtype).reshape(b, t, d))


class JaxDPA(nn.Module):
    """`jax.nn.dot_product_attention` (XLA implementation) on `(B, T, h, d)`."""

    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Any = jnp.float32
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.num_heads
        qkv = layers.dense(3 * d, "qkv", self.dtype)(x).reshape(b, t, 3, self.num_heads, hd)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return layers.dense(d, "proj", self.dtype)(out.reshape(b, t, d))


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
    bench.measure(cases, rounds, 0.5, print)
    return cases


def lever_bf16(batches: tuple[int, ...], rounds: int) -> list[Case]:
    plain = {"Attention": HeadsFirst, "_low_precision": lambda dtype: False}
    cases = []
    for name in (TI, S):
        for batch in batches:
            cases.append(_variant_case("bf16 plain", name, batch, "bfloat16", **plain))
            cases.append(_variant_case("bf16 f32-acc", name, batch, "bfloat16"))
            cases.append(_variant_case("fp32", name, batch, "float32"))
    bench.measure(cases, rounds, 0.5, print)
    return cases


def lever_donate(batches: tuple[int, ...], rounds: int) -> list[Case]:
    cases = []
    for donate in (True, False):
        case = train_case(TI, 32, "float32", donate=donate)
        case.impl = f"donate={donate}"
        cases.append(case)
    bench.measure(cases, rounds, 2.0, print)
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
    bench.measure(cases, rounds, 0.5, print)
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


def _child_flags(batches: tuple[int, ...], rounds: int) -> list[Case]:
    cases = [bench.matmul_case()]
    for name in (TI, S):
        for batch in batches:
            for dtype in ("float32", "bfloat16"):
                cases.append(inference_case(name, batch, dtype))
    cases.append(train_case(TI, 32, "float32"))
    bench.measure(cases, rounds, 0.5, lambda _: None)
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
            # "deit": XLA's defaults plus `deit.compiler`'s per-dtype options; others: flags only.
            env = dict(os.environ, XLA_FLAGS=flags, DEIT_XLA_OPTIONS=str(int(label == "deit")))
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
    "flags": lever_flags,
    "_child_flags": _child_flags,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lever", choices=sorted(LEVERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=sorted(FLAGS), default=list(FLAGS))
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    tick = time.perf_counter()
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
    payload["seconds"] = time.perf_counter() - tick
    name = f"levers_{args.lever}{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
