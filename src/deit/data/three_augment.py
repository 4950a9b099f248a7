"""DeiT III's 3-Augment (Touvron, Cord, Jégou 2022, §3.2 and Figure 3; official `augment.py`,
`new_data_aug_generator`, selected by `--ThreeAugment`) on the host path, for grain's workers.

Per training image, on uint8 `(H, W, 3)`, in the official order:

1. A crop: random-resized-crop (timm's, as `host.train_transform`), or with `src` (official
   `--src`, "simple random crop") a resize of the shorter side to `size` (bicubic), a random
   `size x size` crop of it padded by 4 pixels with reflection, then a horizontal flip
   (torchvision `Resize(size)`, `RandomCrop(size, padding=4, padding_mode="reflect")`,
   `RandomHorizontalFlip()`).
2. Exactly one of grayscale (3 channels), solarize (PIL's threshold 128) or Gaussian blur of
   radius U(0.1, 2), each with probability 1/3 (torchvision `RandomChoice` of the three at p=1).
3. Colour jitter of brightness, contrast and saturation with strength `color_jitter` (official
   `--color-jitter`, 0.3; 0: none): factors U(1 - s, 1 + s) applied in a random order
   (torchvision `ColorJitter(s, s, s)`, no hue), through PIL's `ImageEnhance` as torchvision does
   on PIL images.

It replaces RandAugment and random erasing (the official code swaps the whole transform). Every
draw comes from the one `np.random.Generator` the pipeline seeds per (seed, epoch, index), so the
workers and resume give the same images; `draw` makes the choices of step 2-3 as data and
`apply` runs them (the draws of step 1 are `host`'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from deit.data.host import decode_image, train_transform, train_transform_encoded
from deit.data.randaugment import _check_image, _resample
from deit.errors import InputError

OPS = ("grayscale", "solarize", "gaussian_blur")
BLUR_RADIUS = (0.1, 2.0)  # official GaussianBlur(radius_min=0.1, radius_max=2.)
SRC_PADDING = 4  # official RandomCrop(img_size, padding=4, padding_mode='reflect')
# ColorJitter's adjustments in torchvision's index order (hue, index 3, is off at strength 0).
JITTER = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


@dataclass(frozen=True)
class ThreeAugmentDraw:
    """The random choices of 3-Augment's steps 2-3 for one image."""

    op: int
    """Index into `OPS`."""
    radius: float
    """Blur radius (0.0 unless the op is the blur)."""
    order: tuple[int, ...]
    """Jitter adjustments' order, indices into `JITTER` (empty: no jitter)."""
    factors: tuple[float, ...]
    """Brightness, contrast and saturation factors, by `JITTER` index (empty: no jitter)."""


def draw(rng: np.random.Generator, color_jitter: float = 0.3) -> ThreeAugmentDraw:
    """One image's choices: the op (uniform over `OPS`), the blur radius when it is the blur,
    then the jitter's order and factors `U(max(0, 1 - s), 1 + s)`."""
    if not color_jitter >= 0:
        raise InputError(f"color_jitter {color_jitter}; expected a strength >= 0")
    op = int(rng.integers(len(OPS)))
    radius = float(rng.uniform(*BLUR_RADIUS)) if OPS[op] == "gaussian_blur" else 0.0
    order: tuple[int, ...] = ()
    factors: tuple[float, ...] = ()
    if color_jitter > 0:
        order = tuple(int(i) for i in rng.permutation(len(JITTER)))
        lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
        factors = tuple(float(f) for f in rng.uniform(lo, hi, size=len(JITTER)))
    return ThreeAugmentDraw(op, radius, order, factors)


def apply(pil: Image.Image, drawn: ThreeAugmentDraw) -> Image.Image:
    """Steps 2-3 on an RGB PIL image, with `drawn`'s choices."""
    name = OPS[drawn.op]
    if name == "grayscale":  # torchvision Grayscale(3): L, repeated over 3 channels
        pil = pil.convert("L").convert("RGB")
    elif name == "solarize":
        pil = ImageOps.solarize(pil)
    else:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=drawn.radius))
    for i in drawn.order:
        pil = JITTER[i](pil).enhance(drawn.factors[i])
    return pil


def simple_random_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int,
    hflip: float = 0.5,
    interpolation: str = "bicubic",
) -> Image.Image:
    """Official `--src`: the shorter side resized to `size` (the longer to `int(size * long /
    short)`, as torchvision's `Resize`), reflect-padded by 4, a random `size x size` crop (offsets
    uniform over every position), then a flip with probability `hflip`; a PIL image."""
    _check_image(img)
    if np.ndim(size) != 0 or int(size) <= 0:
        raise InputError(f"size {size!r}; expected a positive int (simple random crop is square)")
    h, w = img.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), _resample(interpolation)))
    p = SRC_PADDING
    # numpy's "reflect" leaves the edge pixel out of the mirror, as torch's reflect padding does
    padded = np.pad(resized, ((p, p), (p, p), (0, 0)), mode="reflect")
    top = int(rng.integers(0, padded.shape[0] - size + 1))
    left = int(rng.integers(0, padded.shape[1] - size + 1))
    pil = Image.fromarray(padded[top : top + size, left : left + size])
    if hflip > 0 and rng.random() < hflip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil


def three_augment(
    data: np.ndarray | bytes | str | Path,
    rng: np.random.Generator,
    size: int,
    *,
    src: bool = False,
    color_jitter: float = 0.3,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    dct: bool = True,
) -> np.ndarray:
    """The whole 3-Augment of one training image, uint8 `(size, size, 3)`, from a decoded
    `(H, W, 3)` array or the encoded file (`host.train_transform_encoded`'s reduced JPEG decode
    applies to the random-resized crop; the simple crop decodes whole)."""
    if src:
        img = data if isinstance(data, np.ndarray) else decode_image(data)
        pil = simple_random_crop(img, rng, size, hflip, interpolation)
    else:
        kw = dict(scale=scale, ratio=ratio, hflip=hflip, interpolation=interpolation)
        if isinstance(data, np.ndarray):
            out = train_transform(data, rng, size, **kw)
        else:
            out = train_transform_encoded(data, rng, size, dct=dct, **kw)
        pil = Image.fromarray(out)
    return np.array(apply(pil, draw(rng, color_jitter)), dtype=np.uint8)
