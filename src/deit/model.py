"""The DeiT model (Touvron et al., 2021, "Training data-efficient image transformers & distillation
through attention", §4): a ViT with a class token and a distillation token, two heads.

Sequence `[cls, dist, patches]`, learned position embedding over all `N + 2` tokens, a shared
encoder, a final LayerNorm, `cls_head` on token 0 and `dist_head` on token 1. At inference the
two heads' logits are averaged (paper §4, "Classification with our approach"). Parameter names
mirror timm's state-dict keys so conversion is a table (see `convert.py`).

The same module is DeiT III (Touvron et al. 2022, official `models_v2.py`, timm's `deit3_*`) with
`init_values` (a LayerScale on each residual branch, `layers.LayerScale`) and `no_embed_class`
(the position embedding covers the patches only and is added before the class token is
prepended), `distilled=False`; its recipe's stochastic depth is `drop_path_schedule="uniform"`.

Over 400 lines, kept whole: the module, its input check, the position embedding's resampling
(at creation, `resample_pos_embed`, and per call, `dynamic_img_size`) and the spec function
`deit_forward` are one definition of the network; split, a change to the token layout would
have to be made in several files at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from deit.compiler import compiler_options
from deit.errors import InputError
from deit.layers import Block, PatchEmbed, dense, dense_init, layer_norm
from deit.variants import get_spec, resolve_name


@struct.dataclass
class DeiTOutput:
    """Logits of the two heads: `cls_logits (B, K)`, `dist_logits (B, K)` or None (plain DeiT).

    Without a batch axis when the model was called on a single `(H, W, C)` image.
    """

    cls_logits: jax.Array
    dist_logits: jax.Array | None = None

    @property
    def logits(self) -> jax.Array:
        """The paper's inference rule: the mean of the two heads (the class head alone if plain)."""
        if self.dist_logits is None:
            return self.cls_logits
        return (self.cls_logits + self.dist_logits) / 2


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class DeiT(nn.Module):
    """DeiT on channels-last images: `(B, H, W, C)` or `(H, W, C)` float, already normalised.

    `distilled=False` is the plain DeiT (class token and one head). `with_dist_head=False` keeps
    the distillation token but only the class head (Hugging Face's `DeiTForImageClassification`).
    `num_classes=0` drops the heads: the outputs are then the final-norm token features `(B, D)`.
    `remat=True` recomputes each block's activations in the backward pass instead of keeping
    them (timm's `set_grad_checkpointing`): the same numbers, ~1/3 more compute. XLA:CPU
    (jaxlib 0.10) hoists the recomputation and saves no memory (jax#19822, `bench/levers.py remat`).

    DeiT III: `init_values` (LayerScale's start value, timm's 1e-6; None: none), `no_embed_class`
    (`pos_embed (1, N, D)`, patches only). `drop_path_schedule`: "linear" rises from 0 to
    `drop_path_rate` over the blocks (DeiT, timm); "uniform" gives every block `drop_path_rate`
    (DeiT III's official `dpr = [drop_path_rate] * depth`).

    `dynamic_img_size=True` accepts any `H x W` whose sides divide by the patch size: the
    position embedding, learned for `img_size`, is resampled to the input's grid on the fly
    (timm's `dynamic_img_size`; `_dynamic_pos_embed`). Parameters are those of `img_size`.
    """

    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    distilled: bool = True
    with_dist_head: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    capture: bool = False
    remat: bool = False
    init_values: float | None = None
    no_embed_class: bool = False
    drop_path_schedule: Literal["linear", "uniform"] = "linear"
    dynamic_img_size: bool = False

    def __post_init__(self) -> None:
        check_config(self)
        super().__post_init__()

    @property
    def grid(self) -> tuple[int, int]:
        h, w = _pair(self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def pos_embed_prefix(self) -> int:
        """The rows of `pos_embed` before the patches': 0 with `no_embed_class` (DeiT III)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> DeiTOutput:
        single = self._check_input(images)
        x = images[None] if single else images
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(
            x.astype(self.dtype)
        )
        b, _, d = x.shape
        # timm's DeiT init: cls_token N(0, 1e-6²); dist_token and pos_embed
        # `trunc_normal_(std=.02)`, in effect N(0, 0.02²) (see `layers.dense_init`).
        prefix = [self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))]
        if self.distilled:
            prefix.append(self.param("dist_token", dense_init, (1, 1, d)))
        gh, gw = self.grid
        pos_embed = self.param("pos_embed", dense_init, (1, gh * gw + self.pos_embed_prefix, d))
        pos_embed = self._dynamic_pos_embed(pos_embed, images.shape[-3:-1]).astype(x.dtype)
        tokens = [jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in prefix]
        if self.no_embed_class:  # DeiT III: positions for the patches, before the class token
            x = jnp.concatenate([*tokens, x + pos_embed], axis=1)
        else:
            x = jnp.concatenate([*tokens, x], axis=1) + pos_embed
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        rates = drop_path_rates(self.drop_path_rate, self.depth, self.drop_path_schedule)
        # `train` is argument 2 counting the module itself; static, since it picks Python branches.
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(self.depth):
            x = block(
                self.num_heads,
                self.mlp_dim,
                self.drop_rate,
                self.attn_drop_rate,
                float(rates[i]),
                self.dtype,
                self.capture,
                self.init_values,
                name=f"blocks_{i}",
            )(x, train)
        x = layer_norm("norm", self.dtype)(x)
        cls_out, dist_out = x[:, 0], x[:, 1] if self.distilled else None
        if self.num_classes > 0:
            cls_out = dense(self.num_classes, "cls_head", self.dtype)(cls_out)
            if dist_out is not None and self.with_dist_head:
                dist_out = dense(self.num_classes, "dist_head", self.dtype)(dist_out)
            elif dist_out is not None:
                dist_out = None
        cls_out = cls_out.astype(jnp.float32)
        dist_out = None if dist_out is None else dist_out.astype(jnp.float32)
        if single:
            cls_out = cls_out[0]
            dist_out = None if dist_out is None else dist_out[0]
        return DeiTOutput(cls_out, dist_out)

    def _check_input(self, images: jax.Array) -> bool:
        if images.ndim not in (3, 4):
            raise InputError(
                f"images have shape {tuple(images.shape)}; expected (B, H, W, C) or (H, W, C)"
            )
        h, w, c = images.shape[-3:]
        if c != self.in_chans:
            raise InputError(
                f"images have {c} channels but the model expects {self.in_chans} (channels last)"
            )
        p = self.patch_size
        if self.dynamic_img_size and (h % p or w % p or h < p or w < p):
            raise InputError(
                f"image is {h}x{w}, not divisible by patch_size {p}; expected sides that are "
                f"multiples of {p}"
            )
        if not self.dynamic_img_size and (h, w) != _pair(self.img_size):
            eh, ew = _pair(self.img_size)
            raise InputError(
                f"image is {h}x{w} but the model was built for {eh}x{ew}; create it with "
                f"img_size=({h}, {w}) (and resample_pos_embed for loaded weights), or with "
                "dynamic_img_size=True"
            )
        return images.ndim == 3

    def _dynamic_pos_embed(self, pos_embed: jax.Array, hw: tuple[int, int]) -> jax.Array:
        """`pos_embed (1, R + gh*gw, D)` for an `hw` image: unchanged on the model's own grid,
        else resampled as timm's `VisionTransformer._pos_embed` does under `dynamic_img_size`
        (`resample_abs_pos_embed`: bicubic, antialiased, the `R` prefix rows kept). `R` is read
        from the shape, so a position embedding over the patches only (`R = 0`) works too.
        Shapes are static, so under `jit` this is traced once per input size."""
        new = (hw[0] // self.patch_size, hw[1] // self.patch_size)
        if new == self.grid:
            return pos_embed
        rows = pos_embed.shape[1] - self.grid[0] * self.grid[1]
        return resample_pos_embed(pos_embed, new, rows, old_grid=self.grid)


def check_config(model: DeiT) -> None:
    """Raise ValueError naming the bad value for an impossible architecture."""
    h, w = _pair(model.img_size)
    p = model.patch_size
    if p <= 0 or h % p or w % p:
        raise InputError(
            f"image side {h}x{w} is not divisible by patch_size {p}; expected multiples of {p}"
        )
    if model.num_heads <= 0 or model.embed_dim % model.num_heads:
        raise InputError(
            f"d_model {model.embed_dim} is not divisible by num_heads {model.num_heads}"
        )
    if model.depth < 0 or model.mlp_dim <= 0 or model.num_classes < 0 or model.in_chans <= 0:
        raise InputError(
            f"depth {model.depth}, mlp_dim {model.mlp_dim}, num_classes {model.num_classes}, "
            f"in_chans {model.in_chans}: expected non-negative depth/classes, positive others"
        )
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not 0.0 <= getattr(model, name) < 1.0:
            raise InputError(f"{name} {getattr(model, name)} is outside [0, 1)")
    if model.drop_path_schedule not in DROP_PATH_SCHEDULES:
        raise InputError(
            f"drop_path_schedule {model.drop_path_schedule!r}; expected one of "
            f"{', '.join(DROP_PATH_SCHEDULES)}"
        )


DROP_PATH_SCHEDULES = ("linear", "uniform")


def drop_path_rates(rate: float, depth: int, schedule: str = "linear") -> list[float]:
    """Each block's stochastic-depth rate: "linear" from 0 at the first block to `rate` at the
    last (DeiT paper Table 9, timm's `dpr`), "uniform" `rate` in every block (DeiT III, official
    `models_v2.py`)."""
    if schedule == "uniform":
        return [float(rate)] * depth
    return [float(r) for r in np.linspace(0.0, rate, depth)]


_FIELDS = {f.name for f in dataclasses.fields(DeiT)} - {"parent", "name"}


def create_model(name: str, **overrides: Any) -> DeiT:
    """A registered variant (`deit_tiny_distilled_patch16_224`, ..., or an alias) as a `DeiT`.

    Overrides are `DeiT` fields: `num_classes`, `img_size`, `drop_path_rate`, `dtype`, ...
    `deit.create_model(name, pretrained=True)` (`pretrained.create_model`) adds the official
    weights; the network layer itself never reaches for files.
    """
    spec = get_spec(name)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise InputError(
            f"unknown override(s) {unknown} for {resolve_name(name)}; expected {sorted(_FIELDS)}"
        )
    kwargs = dict(
        num_classes=spec.num_classes,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_dim=spec.mlp_dim,
        distilled=spec.distilled,
        init_values=spec.init_values,
        no_embed_class=spec.no_embed_class,
    )
    kwargs.update(overrides)
    return DeiT(**kwargs)


def init_params(model: DeiT, seed: int | jax.Array = 0) -> dict:
    """Float32 parameters of `model` initialised from `seed` (an int or a PRNG key)."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    h, w = _pair(model.img_size)
    dummy = jnp.zeros((1, h, w, model.in_chans), jnp.float32)
    return jax.jit(model.init)(key, dummy)["params"]


def param_count(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def flops_per_image(model: DeiT) -> int:
    """Forward FLOPs (2 per multiply-add) of one image: patch embedding, blocks and heads."""
    gh, gw = model.grid
    n, d, m = gh * gw, model.embed_dim, model.mlp_dim
    t = n + model.num_prefix_tokens
    patch = 2 * n * d * model.in_chans * model.patch_size**2
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m
    heads = model.num_prefix_tokens if model.distilled and model.with_dist_head else 1
    return patch + model.depth * block + heads * 2 * d * model.num_classes


def forward_with_attention(
    model: DeiT, variables: dict, images: jax.Array | np.ndarray
) -> tuple[DeiTOutput, list[jax.Array], list[jax.Array]]:
    """Eval-mode outputs plus what every block computed: `(output, attn, tokens)`.

    `attn[i]` is block `i`'s softmax attention `(B, heads, T, T)` (rows: queries, summing to 1),
    `tokens[i]` its output `(B, T, D)` before the final norm; `T = prefix + N`, token 0 is the
    class token and token 1 the distillation token of a distilled model. A single `(H, W, C)`
    image gives the three without the batch axis. Only this clone sows (`capture=True`), so the
    plain model's training and inference graphs stay free of the extra outputs.
    """
    images = jnp.asarray(images)
    capturing = model.clone(capture=True, remat=False)
    run = jax.jit(
        lambda v, x: capturing.apply(v, x, mutable=["intermediates"]),
        compiler_options=compiler_options(model.dtype),
    )
    out, state = run({"params": variables["params"]}, images)
    blocks = [state["intermediates"][f"blocks_{i}"] for i in range(model.depth)]
    # `sow` appends to a tuple; each block runs once, so each tuple holds one array.
    attn = [b["attn"]["attn"][0] for b in blocks]
    tokens = [b["tokens"][0] for b in blocks]
    if images.ndim == 3:
        attn, tokens = [a[0] for a in attn], [t[0] for t in tokens]
    return out, attn, tokens


def forward(
    model: Any, params: Any, batch_stats: Any, x: jax.Array, *, train: bool, rng: Any = None
) -> tuple[jax.Array, jax.Array | None, Any]:
    """`(cls_logits, dist_logits or None, new batch_stats)` for a DeiT or a ResNet teacher: the
    one call that training, evaluation and prediction make (`batch_stats` empty for a DeiT)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    rngs = {"dropout": rng} if rng is not None else None
    if train and batch_stats:
        out, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    else:
        out = model.apply(variables, x, train=train, rngs=rngs)
    if isinstance(out, DeiTOutput):
        return out.cls_logits, out.dist_logits, batch_stats
    return out, None, batch_stats


def resample_pos_embed(
    pos_embed: jax.Array | np.ndarray,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> jax.Array:
    """Resize `(1, prefix + gh*gw, D)` to `new_grid`, bicubic on the patch grid only.

    The prefix tokens (cls, dist) are kept as they are. Antialiased bicubic, which equals timm's
    `resample_abs_pos_embed` (max |Δ| ~1e-6 measured against it). `old_grid` defaults to square.
    """
    pos_embed = jnp.asarray(pos_embed)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, d = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise InputError(f"pos_embed has {n} patch positions; pass old_grid, it is not square")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise InputError(f"old_grid {old_grid} does not hold the {n} patch positions of pos_embed")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, *old_grid, d).astype(jnp.float32)
    grid = jax.image.resize(grid, (1, *new_grid, d), method="bicubic", antialias=True)
    return jnp.concatenate([prefix, grid.reshape(1, -1, d).astype(prefix.dtype)], axis=1)


def adapt_params(params: dict, src: DeiT, dst: DeiT, *, rng: int | jax.Array = 0) -> dict:
    """`src`'s params fitted to `dst`: the same network at another resolution or class count.

    `pos_embed (1, prefix + N_src, D)` is resampled to `dst.grid` (bicubic on the patch grid,
    the cls/dist rows kept as they are, none in DeiT III's; `model.resample_pos_embed`), and the
    heads are freshly initialised from `rng` when the class count differs; everything else is
    copied. This is what the official `main.py --finetune` does: it interpolates the position
    embedding and drops `head` / `head_dist` of the wrong shape.
    """
    fields = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans", "distilled")
    fields += ("with_dist_head", "init_values", "no_embed_class")
    differ = [
        f"{f} {getattr(src, f)} -> {getattr(dst, f)}"
        for f in fields
        if getattr(src, f) != getattr(dst, f)
    ]
    if differ:
        raise InputError(
            f"cannot start from this checkpoint: the architecture differs ({', '.join(differ)}); "
            "only the image size and the class count may change"
        )
    out = dict(params)
    out["pos_embed"] = resample_pos_embed(
        params["pos_embed"], dst.grid, src.pos_embed_prefix, old_grid=src.grid
    )
    if src.num_classes != dst.num_classes:
        fresh = init_params(dst, rng)
        for head in ("cls_head", "dist_head"):
            out.pop(head, None)
            if head in fresh:
                out[head] = fresh[head]
    return out


def deit_forward(
    seed: int,
    image: jax.Array,
    patch_size: int,
    d_model: int,
    num_heads: int,
    d_ff: int,
    num_layers: int,
    num_classes: int,
) -> jax.Array:
    """The spec function: one `(H, W, C)` image through a distilled DeiT initialised from `seed`.

    Returns `concat([cls_logits, dist_logits])` of shape `(2 * num_classes,)`.
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim != 3:
        raise InputError(f"image has shape {tuple(image.shape)}; expected one (H, W, C) image")
    if num_classes <= 0:
        raise InputError(f"num_classes {num_classes}; expected a positive class count")
    h, w, c = image.shape
    model = DeiT(
        num_classes=num_classes,
        img_size=(h, w),
        patch_size=patch_size,
        in_chans=c,
        embed_dim=d_model,
        depth=num_layers,
        num_heads=num_heads,
        mlp_dim=d_ff,
        distilled=True,
    )
    params = model.init(jax.random.PRNGKey(seed), image)
    out = model.apply(params, image)
    return jnp.concatenate([out.cls_logits, out.dist_logits], axis=0)
