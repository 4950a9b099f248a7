"""Features of a DeiT for downstream tasks (detection, segmentation, retrieval), with timm's names
and semantics (`VisionTransformer.forward_features`, `forward_head`, `forward_intermediates`;
`VisionTransformerDistilled.forward_head`).

Functions of `(model, variables, images)` like `model.forward_with_attention`, rather than module
methods: they read the network's own outputs through Flax's `capture_intermediates` (block `i`'s
output, the final norm's output), so the network keeps one compact `__call__` and any kernel
(the fused attention included). Everything is traceable: wrap a call in `jax.jit` (with
`indices`, `norm`, ... fixed by the closure) to compile it once per input shape. Outputs are
float32. Images are `(B, H, W, C)` or one `(H, W, C)`, normalised, as `DeiT.__call__` takes them
(any multiple of the patch size with `dynamic_img_size=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp

from deit.errors import InputError
from deit.layers import dense, layer_norm
from deit.model import DeiT

OutputFormat = Literal["NCHW", "NHWC", "NLC"]
_FORMATS = ("NCHW", "NHWC", "NLC")


def take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[int, ...]:
    """Absolute block indices, as timm's `feature_take_indices`: None takes every block, an int
    `n` the last `n`, a sequence those blocks (negative ones count from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise InputError(
                f"indices {indices}: the last-n count is out of range; expected 1 to {depth} "
                f"(the model has {depth} blocks)"
            )
        return tuple(range(depth - indices, depth))
    taken = []
    for i in indices:
        if not -depth <= int(i) < depth:
            raise InputError(
                f"block index {i} is out of range; expected {-depth} to {depth - 1} "
                f"(the model has {depth} blocks)"
            )
        taken.append(int(i) % depth)
    if not taken:
        raise InputError("indices is empty; expected at least one block index")
    return tuple(taken)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _run(
    model: DeiT, params: dict, images: jax.Array, blocks: tuple[int, ...], norm: bool = False
) -> tuple[jax.Array, list[jax.Array]]:
    """`(final-norm tokens (B, T, D), [block i's output tokens (B, T, D) for i in blocks])`,
    float32; with `norm=True` the blocks' tokens pass through the final norm too. Compiled once
    per model, blocks and input shape (a plain call inside a caller's `jit`)."""
    wanted = {"norm", *(f"blocks_{i}" for i in blocks)}

    def keep(module: Any, method: str) -> bool:
        # Top-level children only: a block's own `norm1`/`norm2` are not the final norm.
        return method == "__call__" and module.name in wanted and len(module.scope.path) == 1

    # remat=False: the capture filter looks at `Block` itself, not its rematerialised wrapper.
    _, state = model.clone(remat=False).apply(
        {"params": params}, images, capture_intermediates=keep, mutable=["intermediates"]
    )
    got = state["intermediates"]
    taken = [got[f"blocks_{i}"]["__call__"][0] for i in blocks]
    if norm:
        final_norm = layer_norm("norm", model.dtype)
        taken = [final_norm.apply({"params": params["norm"]}, y) for y in taken]
    f32 = lambda y: y.astype(jnp.float32)
    return f32(got["norm"]["__call__"][0]), [f32(y) for y in taken]


def _batched(model: DeiT, images: jax.Array | Any) -> tuple[jax.Array, bool]:
    """`(B, H, W, C)` images and whether one `(H, W, C)` image came. Checked here, outside
    `_run`'s `jit`, so a bad shape is the model's one-line error without JAX's traceback note."""
    images = jnp.asarray(images)
    single = model._check_input(images)
    return (images[None], True) if single else (images, False)


def forward_features(model: DeiT, variables: dict, images: jax.Array) -> jax.Array:
    """The final-norm tokens `(B, T, D)`, `T = prefix + N` (token 0 CLS, token 1 DIST for a
    distilled model, then the patches row by row): timm's `forward_features`."""
    x, single = _batched(model, images)
    tokens, _ = _run(model, variables["params"], x, ())
    return tokens[0] if single else tokens


def forward_head(
    model: DeiT, variables: dict, features: jax.Array, *, pre_logits: bool = False
) -> jax.Array:
    """`forward_features`' tokens `(B, T, D)` -> pre-logits `(B, D)` or logits `(B, K)`.

    As timm's `VisionTransformerDistilled.forward_head` in eval mode: a distilled model's
    pre-logits are the mean of the CLS and DIST tokens and its logits the mean of the two heads
    (paper §4); otherwise the CLS token and the class head.
    """
    if features.ndim not in (2, 3):
        raise InputError(
            f"features have shape {tuple(features.shape)}; expected (B, T, D) or (T, D)"
        )
    both = model.distilled and model.with_dist_head
    if pre_logits:
        x = (features[..., 0, :] + features[..., 1, :]) / 2 if both else features[..., 0, :]
        return x.astype(jnp.float32)
    if model.num_classes == 0:
        raise InputError("the model has no heads (num_classes 0); expected pre_logits=True")
    return _heads(model, variables["params"], features)


@partial(jax.jit, static_argnums=0)
def _heads(model: DeiT, params: dict, features: jax.Array) -> jax.Array:
    def head(name: str, token: jax.Array) -> jax.Array:
        layer = dense(model.num_classes, name, model.dtype)
        return layer.apply({"params": params[name]}, token.astype(model.dtype))

    logits = head("cls_head", features[..., 0, :])
    if model.distilled and model.with_dist_head:
        logits = (logits + head("dist_head", features[..., 1, :])) / 2
    return logits.astype(jnp.float32)


def pre_logits(model: DeiT, variables: dict, images: jax.Array) -> jax.Array:
    """Images -> the `(B, D)` embedding a head would read (timm's
    `forward_head(forward_features(x), pre_logits=True)`): what `deit predict --features` saves."""
    return forward_head(
        model, variables, forward_features(model, variables, images), pre_logits=True
    )


def forward_intermediates(
    model: DeiT,
    variables: dict,
    images: jax.Array,
    indices: int | Sequence[int] | None = None,
    *,
    norm: bool = False,
    output_fmt: OutputFormat = "NCHW",
    return_prefix_tokens: bool = False,
    intermediates_only: bool = False,
) -> Any:
    """Chosen blocks' outputs as spatial maps, as timm's `VisionTransformer.forward_intermediates`.

    `indices`: None for every block, an int `n` for the last `n`, a sequence of block indices
    (negative ones count from the end). `norm=True` passes each through the final norm. Each map
    is `(B, D, h, w)` for "NCHW" (timm's default), `(B, h, w, D)` for "NHWC" or `(B, h*w, D)`
    for "NLC", with `h, w = H/P, W/P`; `return_prefix_tokens=True` makes each entry a pair
    `(map, prefix (B, R, D))` (CLS, then DIST). Returns `(forward_features tokens (B, T, D),
    maps)`, or the maps alone with `intermediates_only=True`. A single `(H, W, C)` image gives
    everything without the batch axis.
    """
    if output_fmt not in _FORMATS:
        raise InputError(f"output_fmt {output_fmt!r}; expected one of {_FORMATS}")
    blocks = take_indices(model.depth, indices)
    x, single = _batched(model, images)
    final, taken = _run(model, variables["params"], x, blocks, norm)
    r = model.num_prefix_tokens
    gh, gw = x.shape[1] // model.patch_size, x.shape[2] // model.patch_size
    maps = []
    for y in taken:
        spatial = y[:, r:]
        if output_fmt != "NLC":
            spatial = spatial.reshape(y.shape[0], gh, gw, y.shape[-1])
        if output_fmt == "NCHW":
            spatial = spatial.transpose(0, 3, 1, 2)
        maps.append((spatial, y[:, :r]) if return_prefix_tokens else spatial)
    if single:
        maps = jax.tree_util.tree_map(lambda a: a[0], maps)
        final = final[0]
    return maps if intermediates_only else (final, maps)
