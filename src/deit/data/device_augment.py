"""The GPU path's per-image augmentation as jitted batch ops on the device (`--data.decode gpu`).

The host draws every random choice of an image (`data.gpu`: the crop box, the flip, the
RandAugment ops and their arguments, from `(seed, epoch, position)` exactly as the host path
draws them) and ships them as small arrays; here they are applied to a batch of decoded images
padded to one bucket shape `(B, S, S, 3)`, so that the program compiles once per bucket side.

Each op follows Pillow's arithmetic, the host path's library, so the two paths give nearly the
same pixels (`tests/test_data_gpu.py` states the tolerances):

- crop + resize: Pillow's two-pass separable resampling (horizontal, round to uint8, vertical),
  its bicubic (a = -0.5) or bilinear filter widened by the downscale factor (antialiasing) and
  clamped to the crop, as dense `(out, S)` weight matrices per image;
- RandAugment: LUT ops (posterize, solarize, autocontrast, equalize) on integers, the enhance
  ops as Pillow's `blend` (float32, truncated), the geometric ops as Pillow's affine transform
  (bicubic with a = -1, edge-clamped taps, the fill outside, truncated).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from deit.errors import InputError

# An op's arguments, computed on the host in double precision (`randaugment.op_args`): the six
# affine coefficients of a geometric op, else the op's one number in slot 0.
OP_ARGS = 6
INTERPOLATIONS = ("bicubic", "bilinear")


def _bicubic(x: jax.Array) -> jax.Array:
    a = -0.5  # Pillow's resize filter (its affine transforms use a = -1)
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _triangle(x: jax.Array) -> jax.Array:
    x = jnp.abs(x)
    return jnp.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_triangle, 1.0),
}


def _resize_weights(
    start: jax.Array, length: jax.Array, out: int, side: int, interpolation: str
) -> jax.Array:
    """`(out, side)` weights taking the `length` pixels from `start` of a padded axis of `side`
    to `out`: Pillow's `precompute_coeffs` (support widened by the scale, clamped to the crop,
    each row normalised)."""
    filt, support = _FILTERS[interpolation]
    length = length.astype(jnp.float32)
    scale = length / out
    fscale = jnp.maximum(scale, 1.0)
    sup = support * fscale
    center = (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale
    lo = jnp.maximum(jnp.trunc(center - sup + 0.5), 0.0)
    hi = jnp.minimum(jnp.trunc(center + sup + 0.5), length)
    j = jnp.arange(side, dtype=jnp.float32) - start.astype(jnp.float32)
    w = filt((j[None, :] - center[:, None] + 0.5) / fscale)
    w = jnp.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    return w / jnp.where(total == 0.0, 1.0, total)


def _round8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


# Pillow 13 resizes vertically first when the height shrinks "significantly more" than the width
# (python-pillow/Pillow#9549); this ratio of the two scales fits its choice best on random crops.
VERTICAL_FIRST = 1.5


def resize_crops(
    images: jax.Array, boxes: jax.Array, size: tuple[int, int], interpolation: str = "bicubic"
) -> jax.Array:
    """Crops `boxes` `(B, 4)` int32 `(top, left, height, width)` of `images` `(B, S, S, 3)` and
    resizes each to `size` `(h, w)`: float32 `(B, h, w, 3)` holding integers in [0, 255].

    Pillow's `crop(box).resize(size, BICUBIC)`: two separable passes, each rounded to uint8.
    Pillow 13 runs the vertical pass first when the height shrinks much more than the width;
    `VERTICAL_FIRST` models that choice, not exactly (where it differs, so does the rounding
    between the passes: a grey level or two on photographs, `tests/test_data_gpu.py`)."""
    if interpolation not in INTERPOLATIONS:
        raise InputError(
            f"interpolation {interpolation!r} on the device; expected one of {INTERPOLATIONS}"
        )
    out_h, out_w = size
    side_h, side_w = images.shape[1], images.shape[2]
    wy = jax.vmap(lambda b: _resize_weights(b[0], b[2], out_h, side_h, interpolation))(boxes)
    wx = jax.vmap(lambda b: _resize_weights(b[1], b[3], out_w, side_w, interpolation))(boxes)
    hi = lax.Precision.HIGHEST
    x = images.astype(jnp.float32)
    h_first = _round8(jnp.einsum("bhwc,bow->bhoc", x, wx, precision=hi))
    h_first = _round8(jnp.einsum("bhoc,bph->bpoc", h_first, wy, precision=hi))
    v_first = _round8(jnp.einsum("bhwc,bph->bpwc", x, wy, precision=hi))
    v_first = _round8(jnp.einsum("bpwc,bow->bpoc", v_first, wx, precision=hi))
    ys = boxes[:, 2].astype(jnp.float32) / out_h
    xs = boxes[:, 3].astype(jnp.float32) / out_w
    return jnp.where((ys > VERTICAL_FIRST * xs)[:, None, None, None], v_first, h_first)


def flip(images: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirrors left-right the images `(B, H, W, C)` whose `flips` `(B,)` is true."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


# ---------------------------------------------------------------------------------------------
# RandAugment ops on one float32 (H, W, 3) image of integers; `arg` is (OP_ARGS,) float32.


def _trunc8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.trunc(x), 0.0, 255.0)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    # Pillow's ImagingBlend: in1 + alpha * (in2 - in1) in float, truncated (clipped outside [0, 1])
    return _trunc8(degenerate + factor * (image - degenerate))


def _lut(x: jax.Array, lut: jax.Array) -> jax.Array:
    """`lut` `(256,)` or per channel `(3, 256)` applied to integer-valued `x` `(H, W, 3)`."""
    idx = x.astype(jnp.int32)
    if lut.ndim == 1:
        return lut[idx].astype(jnp.float32)
    return jnp.stack([lut[c][idx[..., c]] for c in range(3)], axis=-1).astype(jnp.float32)


def _grey(x: jax.Array) -> jax.Array:
    """Pillow's RGB -> L: `(R 19595 + G 38470 + B 7471 + 0x8000) >> 16`, integers."""
    i = x.astype(jnp.int32)
    return (i[..., 0] * 19595 + i[..., 1] * 38470 + i[..., 2] * 7471 + 0x8000) >> 16


def _histograms(x: jax.Array) -> jax.Array:
    idx = x.astype(jnp.int32).reshape(-1, 3)
    return jax.vmap(lambda c: jnp.bincount(c, length=256), in_axes=1)(idx)  # (3, 256)


def _autocontrast(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    lo = x.min(axis=(0, 1))
    hi = x.max(axis=(0, 1))
    scale = 255.0 / jnp.where(hi > lo, hi - lo, 1.0)
    ix = jnp.arange(256, dtype=jnp.float32)[None, :]
    lut = jnp.clip(jnp.trunc(ix * scale[:, None] - lo[:, None] * scale[:, None]), 0, 255)
    lut = jnp.where((hi > lo)[:, None], lut, ix)
    return _lut(x, lut)


def _equalize(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    h = _histograms(x)
    nonzero = (h > 0).sum(axis=1)
    last = jnp.take_along_axis(h, (255 - jnp.argmax(h[:, ::-1] > 0, axis=1))[:, None], 1)[:, 0]
    step = (h.sum(axis=1) - last) // 255
    safe = jnp.maximum(step, 1)
    before = jnp.cumsum(h, axis=1) - h
    lut = jnp.minimum((safe[:, None] // 2 + before) // safe[:, None], 255)
    keep = (nonzero <= 1) | (step == 0)
    lut = jnp.where(keep[:, None], jnp.arange(256)[None, :], lut)
    return _lut(x, lut)


def _invert(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return 255.0 - x


def _posterize(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return (x.astype(jnp.int32) & arg[0].astype(jnp.int32)).astype(jnp.float32)


def _solarize(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return jnp.where(x < arg[0], x, 255.0 - x)


def _solarize_add(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return jnp.where(x < 128.0, jnp.minimum(x + arg[0], 255.0), x)


def _color(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    grey = _grey(x).astype(jnp.float32)[..., None]
    return _blend(jnp.broadcast_to(grey, x.shape), x, arg[0])


def _contrast(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    total = _grey(x).sum()
    n = x.shape[0] * x.shape[1]
    mean = (2 * total + n) // (2 * n)  # int(mean + 0.5), in integers
    return _blend(jnp.full_like(x, mean.astype(jnp.float32)), x, arg[0])


def _brightness(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return _blend(jnp.zeros_like(x), x, arg[0])


def _smooth(x: jax.Array) -> jax.Array:
    """Pillow's `ImageFilter.SMOOTH` (3x3, centre 5, divisor 13); the border keeps its pixels."""
    k = jnp.float32(1.0 / 13.0)
    c = jnp.float32(5.0 / 13.0)
    up, mid, down = x[:-2], x[1:-1], x[2:]

    def row(r: jax.Array, centre: jax.Array) -> jax.Array:
        return r[:, :-2] * k + r[:, 1:-1] * centre + r[:, 2:] * k

    ss = row(down, k)
    ss = ss + row(mid, c)
    ss = ss + row(up, k)
    inner = jnp.clip(jnp.floor(ss + 0.5), 0.0, 255.0)
    return x.at[1:-1, 1:-1].set(inner)


def _sharpness(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    return _blend(_smooth(x), x, arg[0])


def _affine(x: jax.Array, arg: jax.Array, fill: jax.Array) -> jax.Array:
    """Pillow's `transform(size, AFFINE, arg, BICUBIC, fillcolor=fill)`: each output pixel's
    centre mapped by `arg`; outside the image the fill, else a bicubic (a = -1) of 4x4
    edge-clamped taps, truncated to uint8."""
    h, w = x.shape[0], x.shape[1]
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) + 0.5,
        jnp.arange(w, dtype=jnp.float32) + 0.5,
        indexing="ij",
    )
    a, b, c, d, e, f = (arg[i] for i in range(6))
    xin = a * xs + b * ys + c
    yin = d * xs + e * ys + f
    inside = (xin >= 0.0) & (xin < w) & (yin >= 0.0) & (yin < h)
    xf, yf = xin - 0.5, yin - 0.5
    x0, y0 = jnp.floor(xf), jnp.floor(yf)
    dx, dy = (xf - x0)[..., None], (yf - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32) - 1, y0.astype(jnp.int32) - 1

    def cubic(v1: jax.Array, v2: jax.Array, v3: jax.Array, v4: jax.Array, t: jax.Array):
        p2 = -v1 + v3
        p3 = 2.0 * (v1 - v2) + v3 - v4
        p4 = -v1 + v2 - v3 + v4
        return v2 + t * (p2 + t * (p3 + t * p4))

    def tap_row(yy: jax.Array) -> jax.Array:
        yy = jnp.clip(yy, 0, h - 1)
        cols = [x[yy, jnp.clip(x0 + k, 0, w - 1)] for k in range(4)]
        return cubic(*cols, dx)

    v = cubic(*(tap_row(y0 + k) for k in range(4)), dy)
    return jnp.where(inside[..., None], _trunc8(v), fill)


DEVICE_OPS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _affine,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "ColorIncreasing": _color,
    "Contrast": _contrast,
    "ContrastIncreasing": _contrast,
    "Brightness": _brightness,
    "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _affine,
    "ShearY": _affine,
    "TranslateXRel": _affine,
    "TranslateYRel": _affine,
}


def apply_op(name: str, image: jax.Array, arg: jax.Array, fill: tuple[int, int, int]) -> jax.Array:
    """One RandAugment op on one float32 `(H, W, 3)` image of integers (tests and probes)."""
    return DEVICE_OPS[name](image, arg, jnp.asarray(fill, jnp.float32))


def randaugment(
    images: jax.Array,
    op: jax.Array,
    arg: jax.Array,
    ops: tuple[str, ...],
    fill: tuple[int, int, int],
) -> jax.Array:
    """The drawn ops in order on float32 `(B, H, W, 3)`: `op` `(B, L)` int32 indexes `ops` (-1:
    none in that layer), `arg` `(B, L, OP_ARGS)` their arguments."""
    fill_v = jnp.asarray(fill, jnp.float32)
    branches = [partial(DEVICE_OPS[name], fill=fill_v) for name in ops]
    branches.append(lambda x, a: x)  # a layer whose op was not applied

    def one(x: jax.Array, index: jax.Array, a: jax.Array) -> jax.Array:
        index = jnp.where(index < 0, len(ops), index)
        return lax.switch(index, branches, x, a)

    for layer in range(op.shape[1]):
        images = jax.vmap(one)(images, op[:, layer], arg[:, layer])
    return images


@partial(jax.jit, static_argnames=("size", "ops", "fill", "interpolation"))
def augment_batch(
    images: jax.Array,
    box: jax.Array,
    flips: jax.Array,
    op: jax.Array,
    arg: jax.Array,
    *,
    size: tuple[int, int],
    ops: tuple[str, ...],
    fill: tuple[int, int, int],
    interpolation: str = "bicubic",
) -> jax.Array:
    """Crop + resize -> flip -> RandAugment on the device: padded uint8 `(B, S, S, 3)` and the
    host's draws -> uint8 `(B, size[0], size[1], 3)`, what the host path's workers produce."""
    x = resize_crops(images, box, size, interpolation)
    x = flip(x, flips)
    if op.shape[1] and ops:
        x = randaugment(x, op, arg, ops, fill)
    return x.astype(jnp.uint8)
