"""Transformer building blocks of DeiT, named after timm's modules so checkpoints map by table.

Numerics follow the reference weights (DeiT paper §3, timm `vision_transformer.py`): pre-norm
blocks, LayerNorm eps 1e-6, fused `qkv` projection with bias in `[q | k | v]` head-major order,
attention scale `head_dim ** -0.5`, exact (erf) GELU. Parameters are float32; `dtype` is the
compute dtype. Softmax statistics are always float32 so bf16 attention stays finite. bf16
matmuls accumulate in float32 on every backend; on the CPU they also *return* float32
(`preferred_element_type`), the form XLA's CPU backend hands to YNNPACK's bf16 kernels (1.6-2x
faster than bf16-out dots, `bench/levers.py bf16`), while on the GPU they return bf16 as
cuBLAS/cuDNN's epilogues do (a float32 output would double the bytes each matmul writes). Which
kernels a program gets is chosen while tracing, by backend and dtype (`attention_kernel`,
`f32_outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from deit.errors import InputError

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


def f32_outputs(dtype: Any) -> bool:
    """Whether matmuls and convolutions computing in `dtype` return float32 before the cast back
    (the CPU's fast bf16 form) rather than `dtype` itself (the GPU's). Read while tracing."""
    low = dtype is not None and jnp.dtype(dtype) != jnp.float32
    return low and jax.default_backend() == "cpu"


def dense(features: int, name: str, dtype: jnp.dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_init,
        dot_general=_f32_dot if f32_outputs(dtype) else None,
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
            conv_general_dilated=_f32_conv if f32_outputs(self.dtype) else None,
            kernel_init=_symmetric_uniform(bound),
            bias_init=_symmetric_uniform(bound),
            name="proj",
        )(x)
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d)


ATTENTION_KERNELS = ("auto", "einsum", "xla", "cudnn")


def attention_kernel(dtype: Any, head_dim: int) -> str:
    """The attention kernel for a program computing in `dtype` with heads of `head_dim`:

    - "cudnn": cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`, forward
      and backward; on NVIDIA GPUs for bf16/fp16 with `head_dim` a multiple of 8 up to 128.
    - "xla": the same function without a kernel named, i.e. XLA's own attention. It is one
      more way to the numbers of "einsum"; kept to compare against.
    - "einsum": two einsums around a float32 softmax: elsewhere (the CPU, float32 on a GPU);
      on the CPU the faster form (`bench/attention.py`).

    Read while tracing. `DEIT_ATTENTION=einsum|xla|cudnn` overrides the choice ("auto" or
    unset: by backend as above); asking for "cudnn" where it cannot run is an `InputError`.
    """
    choice = os.environ.get("DEIT_ATTENTION", "auto") or "auto"
    if choice not in ATTENTION_KERNELS:
        raise InputError(f"DEIT_ATTENTION={choice!r}; expected one of {ATTENTION_KERNELS}")
    low = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    cudnn_ok = low and head_dim % 8 == 0 and head_dim <= 128
    if choice == "cudnn" and not (cudnn_ok and jax.default_backend() == "gpu"):
        raise InputError(
            f"DEIT_ATTENTION=cudnn needs an NVIDIA GPU, bfloat16/float16 compute and a head "
            f"dimension that is a multiple of 8 up to 128; got {jax.default_backend()}, "
            f"{jnp.dtype(dtype or jnp.float32).name}, head_dim {head_dim}"
        )
    if choice != "auto":
        return choice
    return "cudnn" if cudnn_ok and jax.default_backend() == "gpu" else "einsum"


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
        kernel = attention_kernel(self.dtype, head_dim)
        if kernel != "einsum" and not self.capture and not (train and self.attn_drop > 0):
            # timm's row order [q | k | v], each head-major, is already (B, T, 3, h, d): q, k
            # and v in the (B, T, h, d) layout the fused kernels take, with no transpose.
            qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
            out = jax.nn.dot_product_attention(
                qkv[:, :, 0],
                qkv[:, :, 1],
                qkv[:, :, 2],
                implementation="cudnn" if kernel == "cudnn" else None,
            )
            out = dense(d, "proj", self.dtype)(out.reshape(b * t, d)).reshape(b, t, d)
            return nn.Dropout(self.proj_drop)(out, deterministic=not train)
        # One transpose to heads-first (3, B, h, T, d) makes both attention matmuls plain batched
        # ones (~7% faster on CPU).
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
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


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch, `x * gamma` with `gamma (D,)` started
    at `init_values` (CaiT §2; DeiT III's blocks). timm names it `ls1.gamma` / `ls2.gamma`, the
    official `models_v2.py` `gamma_1` / `gamma_2`."""

    init_values: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_values), (x.shape[-1],), jnp.float32
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    With `init_values` set (DeiT III) each branch is scaled by a `LayerScale` (`ls1`, `ls2`)
    before the drop path, as in the official `Layer_scale_init_Block` and timm's `Block`.
    """

    num_heads: int
    mlp_dim: int
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32
    capture: bool = False
    init_values: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def branch(y: jax.Array, scale: str) -> jax.Array:
            if self.init_values is not None:
                y = LayerScale(self.init_values, name=scale)(y)
            return DropPath(self.drop_path)(y, train=train)

        y = Attention(
            self.num_heads, self.attn_drop, self.drop, self.dtype, self.capture, name="attn"
        )(layer_norm("norm1", self.dtype)(x), train=train)
        x = x + branch(y, "ls1")
        y = Mlp(self.mlp_dim, self.drop, self.dtype, name="mlp")(
            layer_norm("norm2", self.dtype)(x), train=train
        )
        x = x + branch(y, "ls2")
        if self.capture:
            self.sow("intermediates", "tokens", x)
        return x
