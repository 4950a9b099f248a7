"""Transformer building blocks of DeiT, named after timm's modules so checkpoints map by table.

Numerics follow the reference weights (DeiT paper §3, timm `vision_transformer.py`): pre-norm
blocks, LayerNorm eps 1e-6, fused `qkv` projection with bias in `[q | k | v]` head-major order,
attention scale `head_dim ** -0.5`, exact (erf) GELU. Parameters are float32; `dtype` is the
compute dtype. Softmax statistics are always float32 so bf16 attention stays finite, and bf16
matmuls accumulate in float32 (`preferred_element_type`): more accurate, and the form XLA's CPU
backend hands to YNNPACK's bf16 kernels (1.6-2x faster than bf16-out dots, `bench/levers.py
bf16`; `deit.compiler` keeps YNNPACK on for bf16 programs for this reason).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

LN_EPS = 1e-6

# timm's `trunc_normal_(std=.02)` for every Linear. Its cut is at ±2 absolute, i.e. ±100σ, so the
# weights are in effect N(0, 0.02²); flax's `truncated_normal(0.02)` would cut at ±2σ (std 0.0176).
# A plain normal rather than `truncated_normal(lower=-100, upper=100)`: jax draws the latter by
# inverting the CDF over a range whose end is erf(±100/√2) = ±1, so ~1e-7 of the weights come
# out as the bound itself, ±2.0; `normal` keeps its uniform draws off ±1.
dense_init = nn.initializers.normal(stddev=0.02)


def _symmetric_uniform(bound: float) -> Callable:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_norm(name: str, dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def _f32_dot(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.dot_general` accumulating in float32, returned in the inputs' dtype."""
    out = jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32
    )
    return out.astype(lhs.dtype)


def _f32_conv(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated` accumulating in float32, returned in the inputs' dtype."""
    kwargs["preferred_element_type"] = jnp.float32
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs).astype(lhs.dtype)


def _low_precision(dtype: Any) -> bool:
    return dtype is not None and jnp.dtype(dtype) != jnp.float32


def dense(features: int, name: str, dtype: jnp.dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_init,
        dot_general=_f32_dot if _low_precision(dtype) else None,
        name=name,
    )


class PatchEmbed(nn.Module):
    """Non-overlapping P×P patches projected to D: `(B, H, W, C)` -> `(B, H/P * W/P, D)`.

    Initialised as timm leaves DeiT's patch embedding: torch's default `Conv2d` init, kernel and
    bias both U(±1/√fan_in) with `fan_in = P·P·C` (kaiming-uniform with a = √5), which timm's ViT
    init does not override.
    """

    patch_size: int
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        bound = (p * p * x.shape[-1]) ** -0.5
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=_f32_conv if _low_precision(self.dtype) else None,
            kernel_init=_symmetric_uniform(bound),
            bias_init=_symmetric_uniform(bound),
            name="proj",
        )(x)
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d)


def fused_attention() -> bool:
    """Whether attention uses `jax.nn.dot_product_attention` (on GPU: cuDNN's fused kernel) or
    the two einsums (elsewhere: on CPU the einsums are the faster of the two, `bench/attention.py`).
    Read while tracing; `DEIT_ATTENTION=fused|einsum` overrides the choice by backend."""
    choice = os.environ.get("DEIT_ATTENTION", "")
    if choice in ("fused", "einsum"):
        return choice == "fused"
    return jax.default_backend() == "gpu"


class Attention(nn.Module):
    """Multi-head self-attention with one fused `qkv` Dense: `(B, T, D)` -> `(B, T, D)`.

    With `capture=True` the attention probabilities `(B, heads, T, T)` are sown into the
    `intermediates` collection under `attn`.
    """

    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: jnp.dtype = jnp.float32
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        head_dim = d // self.num_heads
        # Dense layers see `(B*T, D)`: XLA:CPU runs the 2-D matmuls and the bias gradients (a sum
        # over one axis instead of (B, T)) faster: DeiT-Ti fp32 forward +15%, training step +14%
        # (`bench/levers.py step`, before/after in bench/results/levers_step*.json).
        qkv = dense(3 * d, "qkv", self.dtype)(x.reshape(b * t, d))
        # timm's row order: [q | k | v], each split head-major. One transpose to heads-first
        # (3, B, h, T, d) makes both attention matmuls plain batched ones (~7% faster on CPU).
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if fused_attention() and not self.capture and not (train and self.attn_drop > 0):
            # (B, T, h, d) in and out: XLA's fused attention (cuDNN flash attention on NVIDIA).
            out = jax.nn.dot_product_attention(
                q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            )
            out = dense(d, "proj", self.dtype)(out.reshape(b * t, d)).reshape(b, t, d)
            return nn.Dropout(self.proj_drop)(out, deterministic=not train)
        logits = jnp.einsum(
            "bhqd,bhkd->bhqk", q * head_dim**-0.5, k, preferred_element_type=jnp.float32
        )
        probs = jax.nn.softmax(logits, axis=-1)
        if self.capture:
            self.sow("intermediates", "attn", probs)
        probs = nn.Dropout(self.attn_drop)(probs, deterministic=not train)
        out = jnp.einsum(
            "bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        out = out.astype(v.dtype).transpose(0, 2, 1, 3).reshape(b * t, d)
        out = dense(d, "proj", self.dtype)(out).reshape(b, t, d)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in torch's form, `x / 2 * (1 + erf(x / sqrt(2)))`, computed in float32.

    Flax's `nn.gelu` defaults to the tanh approximation, and its exact branch goes through
    `erfc`, which XLA's CPU backend evaluates 3x slower than `erf` (within 1e-6 of each other).
    bf16 inputs are evaluated in float32 and rounded once: more accurate, and on XLA:CPU it keeps
    the GELU out of the bf16 matmul fusions (DeiT-Ti bf16 inference +12-18%, training step +8%;
    `bench/levers.py gelu`).
    """
    y = x.astype(jnp.float32)
    return (0.5 * y * (1.0 + jax.lax.erf(y * 2.0**-0.5))).astype(x.dtype)


class Mlp(nn.Module):
    """`fc1` -> exact GELU -> `fc2`: `(B, T, D)` -> `(B, T, D)`."""

    hidden_dim: int
    drop: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        shape, d = x.shape, x.shape[-1]
        x = gelu(dense(self.hidden_dim, "fc1", self.dtype)(x.reshape(-1, d)))
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = dense(d, "fc2", self.dtype)(x).reshape(shape)
        return nn.Dropout(self.drop)(x, deterministic=not train)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability `rate`."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    num_heads: int
    mlp_dim: int
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        branch: Callable[[jax.Array], jax.Array] = lambda y: DropPath(self.drop_path)(
            y, train=train
        )
        y = Attention(
            self.num_heads, self.attn_drop, self.drop, self.dtype, self.capture, name="attn"
        )(layer_norm("norm1", self.dtype)(x), train=train)
        x = x + branch(y)
        y = Mlp(self.mlp_dim, self.drop, self.dtype, name="mlp")(
            layer_norm("norm2", self.dtype)(x), train=train
        )
        x = x + branch(y)
        if self.capture:
            self.sow("intermediates", "tokens", x)
        return x
