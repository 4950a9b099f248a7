"""Batch augmentation on the device, inside the jitted train step (DeiT §6, Table 9).

Normalisation, random erasing (Zhong et al., 2020; timm's `RandomErasing`) and mixup / cutmix with
label smoothing (timm's `Mixup` in "batch" mode). Every function is pure, takes an explicit PRNG
key and has static shapes: boxes are masks built from `iota` comparisons rather than slices, and
random choices are `where`s, so the same key always gives the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from deit.errors import InputError
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

ERASE_ATTEMPTS = 10  # timm's retry budget for a box that fits inside the image
ERASING_MODES = ("const", "rand", "pixel")

Box = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (top, bottom, left, right), half-open


def normalize(
    images: jax.Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """`(x / 255 - mean) / std` per channel: uint8 or float `(B, H, W, C)` in [0, 255] -> float32.

    timm's `ToTensor` + `Normalize`, done on the device so the host ships uint8 batches.
    """
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Label-smoothed one-hot targets `(B,) -> (B, K)`, rows summing to 1.

    timm's mixup convention: `off = smoothing / K`, `on = 1 - smoothing + off`.
    """
    if not 0.0 <= smoothing < 1.0:
        raise InputError(f"smoothing {smoothing} is outside [0, 1)")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


@dataclass(frozen=True)
class MixupConfig:
    """timm `Mixup` settings (DeiT defaults: mixup 0.8, cutmix 1.0, prob 1, switch 0.5, eps 0.1).

    An alpha of 0 turns that method off; both at 0 leave only label smoothing.
    """

    mixup_alpha: float = 0.8
    """Beta(alpha, alpha) of mixup's blend weight; 0: no mixup."""
    cutmix_alpha: float = 1.0
    """Beta(alpha, alpha) of cutmix's box area; 0: no cutmix."""
    prob: float = 1.0
    """Chance that a batch is mixed at all."""
    switch_prob: float = 0.5
    """With both on: chance that a mixed batch uses cutmix rather than mixup."""
    label_smoothing: float = 0.1
    """Label smoothing of the (mixed) targets (official `--smoothing`)."""

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0.0:
                raise InputError(f"{name} {getattr(self, name)}; expected a value >= 0")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} {getattr(self, name)} is outside [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"label_smoothing {self.label_smoothing} is outside [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)


def _box_mask(height: int, width: int, box: Box) -> jax.Array:
    top, bottom, left, right = box
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def cutmix_box(
    rng: jax.Array, height: int, width: int, lam: jax.Array | float
) -> tuple[Box, jax.Array]:
    """A cutmix box of area about `1 - lam` and the lambda corrected for clipping.

    timm's `rand_bbox`: sides `int(size * sqrt(1 - lam))`, a uniformly random centre, then
    `[centre - side // 2, centre + (side + 1) // 2)` clipped to the image, so an odd side keeps
    its length (the timm of the published runs ended at `centre + side // 2`, one pixel short).
    Returns `((top, bottom, left, right), lam)` with `lam = 1 - box_area / (H * W)`, the
    fraction of pixels that keep their image.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    top = jnp.clip(cy - cut_h // 2, 0, height)
    bottom = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(cx - cut_w // 2, 0, width)
    right = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    area = (bottom - top) * (right - left)
    return (top, bottom, left, right), 1.0 - area / (height * width)


def _mix_images(images: jax.Array, blend: jax.Array | None, box: Box | None) -> jax.Array:
    flipped = images[::-1]
    out = images
    if blend is not None:
        out = (blend * images + (1.0 - blend) * flipped).astype(images.dtype)
    if box is not None:
        inside = _box_mask(images.shape[1], images.shape[2], box)[None, :, :, None]
        out = jnp.where(inside, flipped, out)
    return out


def _mix_targets(
    labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float
) -> jax.Array:
    y = smooth_one_hot(labels, num_classes, smoothing)
    return lam * y + (1.0 - lam) * y[::-1]


def mix_with_lambda(
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    lam: jax.Array | float,
    box: Box | None = None,
    smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Mix each image with its mirror in the batch (`images[::-1]`): `(B, H, W, C), (B,)`.

    Without `box`: mixup, `lam * x + (1 - lam) * x[::-1]`. With `box`: cutmix, the pixels inside
    the box come from `x[::-1]`, the rest are unchanged, and `lam` should be `cutmix_box`'s
    corrected value. Targets are `lam * smooth(y) + (1 - lam) * smooth(y[::-1])`, `(B, K)`,
    rows summing to 1. `lam = 1` without a box is the identity on the images.
    """
    lam = jnp.asarray(lam, jnp.float32)
    mixed = _mix_images(images, lam if box is None else None, box)
    return mixed, _mix_targets(labels, num_classes, lam, smoothing)


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    cfg: MixupConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """timm `Mixup` in "batch" mode: `(B, H, W, C), (B,) -> (B, H, W, C), (B, K)` targets.

    One lambda for the whole batch. With probability `prob` the batch is mixed, by cutmix with
    probability `switch_prob` when both alphas are positive (else by whichever is on), with
    `lam ~ Beta(alpha, alpha)`; cutmix's lambda is corrected for the clipped box. Otherwise
    `lam = 1`: images unchanged, targets the smoothed one-hot labels. `cfg=None` means the DeiT
    defaults. Unlike timm, an odd batch is allowed (its middle image mixes with itself).
    """
    cfg = cfg or MixupConfig()
    if not cfg.enabled:
        return images, smooth_one_hot(labels, num_classes, cfg.label_smoothing)
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    apply = jax.random.uniform(k_apply) < cfg.prob
    if cfg.mixup_alpha > 0.0 and cfg.cutmix_alpha > 0.0:
        use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0.0)
    one = jnp.ones((), jnp.float32)
    lam_mixup = one
    if cfg.mixup_alpha > 0.0:
        lam_mixup = jax.random.beta(k_mixup, cfg.mixup_alpha, cfg.mixup_alpha)
    lam_box, box = one, (jnp.int32(0),) * 4
    if cfg.cutmix_alpha > 0.0:
        lam_cutmix = jax.random.beta(k_cutmix, cfg.cutmix_alpha, cfg.cutmix_alpha)
        box, lam_box = cutmix_box(k_box, images.shape[1], images.shape[2], lam_cutmix)
    # A traced choice cannot pick a code path: the unused method gets blend 1 or an empty box.
    do_cutmix = apply & use_cutmix
    blend = jnp.where(apply & ~use_cutmix, lam_mixup, one)
    box = tuple(jnp.where(do_cutmix, b, 0) for b in box)
    lam = jnp.where(do_cutmix, lam_box, blend)
    mixed = _mix_images(images, blend, box)
    return mixed, _mix_targets(labels, num_classes, lam, cfg.label_smoothing)


@dataclass(frozen=True)
class ErasingConfig:
    """timm `RandomErasing` settings (DeiT: p 0.25, pixel mode, area 0.02-1/3, aspect >= 0.3).

    `max_aspect=None` means `1 / min_aspect`. Modes: "pixel" per-pixel N(0, 1) noise, "rand" one
    N(0, 1) colour per box, "const" zeros (the normalised mean).
    """

    prob: float = 0.25
    """Chance that an image gets an erased box (official `--reprob`)."""
    min_area: float = 0.02
    """Smallest box, as a fraction of the image area."""
    max_area: float = 1 / 3
    """Largest box, as a fraction of the image area."""
    min_aspect: float = 0.3
    """Smallest height / width of the box."""
    max_aspect: float | None = None
    """Largest height / width; None: 1 / min_aspect."""
    mode: Literal["pixel", "rand", "const"] = "pixel"
    """Fill: per-pixel N(0, 1) noise, one N(0, 1) colour per box, or zeros (official `--remode`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise InputError(f"erasing prob {self.prob} is outside [0, 1]")
        if not 0.0 < self.min_area <= self.max_area <= 1.0:
            raise InputError(
                f"erasing area ({self.min_area}, {self.max_area}); expected 0 < min <= max <= 1"
            )
        if not self.min_aspect > 0.0 or not self.aspect_range[1] >= self.min_aspect:
            raise InputError(
                f"erasing aspect ({self.min_aspect}, {self.max_aspect}); expected 0 < min <= max"
            )
        if self.mode not in ERASING_MODES:
            raise InputError(
                f"erasing mode {self.mode!r}; expected one of {', '.join(ERASING_MODES)}"
            )

    @property
    def aspect_range(self) -> tuple[float, float]:
        hi = 1.0 / self.min_aspect if self.max_aspect is None else self.max_aspect
        return self.min_aspect, hi


def _erase_one(rng: jax.Array, image: jax.Array, cfg: ErasingConfig) -> jax.Array:
    height, width, chans = image.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(rng, 6)
    frac = jax.random.uniform(k_area, (ERASE_ATTEMPTS,), minval=cfg.min_area, maxval=cfg.max_area)
    area = height * width * frac
    lo, hi = (math.log(a) for a in cfg.aspect_range)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (ERASE_ATTEMPTS,), minval=lo, maxval=hi))
    # jnp.round halves to even, like Python's round() in timm.
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits)  # timm keeps the first attempt that fits
    h, w = h[first], w[first]
    top = jax.random.randint(k_top, (), 0, height - h + 1)
    left = jax.random.randint(k_left, (), 0, width - w + 1)
    erase = (jax.random.uniform(k_apply) < cfg.prob) & fits[first]
    inside = erase & _box_mask(height, width, (top, top + h, left, left + w))[:, :, None]
    if cfg.mode == "pixel":
        fill = jax.random.normal(k_fill, image.shape, image.dtype)
    elif cfg.mode == "rand":
        fill = jax.random.normal(k_fill, (chans,), image.dtype)
    else:
        fill = jnp.zeros((), image.dtype)
    return jnp.where(inside, fill, image)


def random_erasing(
    rng: jax.Array,
    images: jax.Array,
    cfg: ErasingConfig | None = None,
) -> jax.Array:
    """timm `RandomErasing` with one box (count 1), independently per image: `(B, H, W, C)`.

    `images` are already normalised, so N(0, 1) noise matches timm's erased pixels. Each image is
    erased with probability `prob`; of `ERASE_ATTEMPTS` (area, log-aspect) draws, the first box
    that fits strictly inside the image is used at a uniform position, none if no draw fits.
    `cfg=None` means the DeiT defaults.
    """
    cfg = cfg or ErasingConfig()
    if cfg.prob == 0.0:
        return images
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(lambda k, x: _erase_one(k, x, cfg))(keys, images)
