"""timm's RandAugment (`rand-m9-mstd0.5-inc1`, Cubuk et al. 2019; DeiT §6, Table 9) on PIL images,
for the host path's workers, and its draws as data for the GPU path.

`RandAugment.draw(rng)` makes every random choice of one image (which ops, whether each applies,
its magnitude and its sign) in the order `augment` has always made them, and `apply` runs the
drawn ops; `augment(pil, rng)` is the two in turn. The GPU path (`data.gpu`) ships the same draws
to the device, so both paths augment an image identically given `(seed, epoch, index)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from deit.errors import InputError

_RESAMPLE = {mode.name.lower(): mode for mode in Image.Resampling}
# timm's magnitude scale: M in [0, 10] maps to the full range of each op's argument.
_LEVEL_DENOM = 10.0
# timm passes round(255 * IMAGENET_DEFAULT_MEAN) as the fill of geometric ops.
IMAGENET_FILL = (124, 116, 104)


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise InputError(f"interpolation {name!r}; expected one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[name]


def _check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"image is {img.dtype}{tuple(img.shape)}; expected uint8 (H, W, 3)")


def _enhance(kind: type, increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, sign: float, ra: RandAugment) -> Image.Image:
        # "increasing" moves away from the identity factor 1.0 as M grows; the original maps M
        # linearly onto [0.1, 1.9], so there M=5 is the identity.
        factor = max(0.1, 1.0 + sign * 0.9 * f) if increasing else 1.8 * f + 0.1
        return kind(img).enhance(factor)

    return op


def _posterize(increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, sign: float, ra: RandAugment) -> Image.Image:
        bits = int(4 * f)
        bits = 4 - bits if increasing else bits
        # Recent PIL refuses to keep 0 bits, which increasing M=10 asks for; masking by hand gives
        # the black image older PIL (the one timm's published runs used) produced.
        mask = (0xFF << (8 - bits)) & 0xFF
        return img.point([i & mask for i in range(256)] * 3)

    return op


def _solarize(increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, sign: float, ra: RandAugment) -> Image.Image:
        thresh = int(256 * f)
        return ImageOps.solarize(img, 256 - thresh if increasing else thresh)

    return op


def _solarize_add(img: Image.Image, f: float, sign: float, ra: RandAugment):
    add = int(110 * f)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def _rotate(img: Image.Image, f: float, sign: float, ra: RandAugment):
    degrees = sign * 30.0 * f
    return img.rotate(degrees, resample=_resample(ra.interpolation), fillcolor=ra.fill)


def _affine(coeffs: Callable[[float, Image.Image], tuple], max_level: float | None) -> Callable:
    def op(img: Image.Image, f: float, sign: float, ra: RandAugment) -> Image.Image:
        v = sign * f * (ra.translate_pct if max_level is None else max_level)
        return img.transform(
            img.size,
            Image.Transform.AFFINE,
            coeffs(v, img),
            resample=_resample(ra.interpolation),
            fillcolor=ra.fill,
        )

    return op


_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, f, sign, ra: ImageOps.autocontrast(img),
    "Equalize": lambda img, f, sign, ra: ImageOps.equalize(img),
    "Invert": lambda img, f, sign, ra: ImageOps.invert(img),
    "Rotate": _rotate,
    "Posterize": _posterize(False),
    "PosterizeIncreasing": _posterize(True),
    "Solarize": _solarize(False),
    "SolarizeIncreasing": _solarize(True),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color, False),
    "ColorIncreasing": _enhance(ImageEnhance.Color, True),
    "Contrast": _enhance(ImageEnhance.Contrast, False),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast, True),
    "Brightness": _enhance(ImageEnhance.Brightness, False),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness, True),
    "Sharpness": _enhance(ImageEnhance.Sharpness, False),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness, True),
    "ShearX": _affine(lambda v, img: (1, v, 0, 0, 1, 0), 0.3),
    "ShearY": _affine(lambda v, img: (1, 0, 0, v, 1, 0), 0.3),
    # translations are a fraction of the image side (timm's *Rel ops, default 0.45)
    "TranslateXRel": _affine(lambda v, img: (1, 0, v * img.size[0], 0, 1, 0), None),
    "TranslateYRel": _affine(lambda v, img: (1, 0, 0, 0, 1, v * img.size[1]), None),
}
_COMMON = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_PHOTOMETRIC = ("Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness")
RAND_TRANSFORMS = (*_COMMON, *_PHOTOMETRIC, "Sharpness", *_GEOMETRIC)
RAND_INCREASING_TRANSFORMS = (
    *_COMMON,
    *(op if op == "SolarizeAdd" else op + "Increasing" for op in (*_PHOTOMETRIC, "Sharpness")),
    *_GEOMETRIC,
)


def _rotation(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """The inverse affine matrix `Image.rotate(degrees)` hands to `transform` (no expand)."""
    if degrees % 360.0 == 0.0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # Pillow copies the image
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = w / 2.0, h / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def op_args(name: str, level: float, sign: float, ra: RandAugment, size: tuple[int, int]):
    """What op `name` at `level` (magnitude / 10) and `sign` hands Pillow on an image of `size`
    `(w, h)`, in double precision: the affine matrix of a geometric op (6 numbers), else its one
    number (bits mask, threshold, addend or enhance factor). The GPU path ships these."""
    w, h = size
    if name == "Rotate":
        return _rotation(sign * 30.0 * level, w, h)
    if name in ("ShearX", "ShearY"):
        v = sign * level * 0.3
        return (1.0, v, 0.0, 0.0, 1.0, 0.0) if name == "ShearX" else (1.0, 0.0, 0.0, v, 1.0, 0.0)
    if name in ("TranslateXRel", "TranslateYRel"):
        v = sign * level * ra.translate_pct
        if name == "TranslateXRel":
            return (1.0, 0.0, v * w, 0.0, 1.0, 0.0)
        return (1.0, 0.0, 0.0, 0.0, 1.0, v * h)
    if name.startswith("Posterize"):
        bits = int(4 * level)
        bits = 4 - bits if name.endswith("Increasing") else bits
        return ((0xFF << (8 - bits)) & 0xFF,)
    if name.startswith("SolarizeAdd"):
        return (int(110 * level),)
    if name.startswith("Solarize"):
        thresh = int(256 * level)
        return (256 - thresh if name.endswith("Increasing") else thresh,)
    if name.endswith("Increasing"):
        return (max(0.1, 1.0 + sign * 0.9 * level),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (1.8 * level + 0.1,)
    return ()


# Ops whose argument flips sign with probability 1/2 (timm's `_randomly_negate`).
SIGNED = frozenset(
    (
        "Rotate",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
        *(op + "Increasing" for op in ("Color", "Contrast", "Brightness", "Sharpness")),
    )
)


def _draw_sign(name: str, rng: np.random.Generator) -> float:
    return -1.0 if name in SIGNED and rng.random() > 0.5 else 1.0


@dataclass(frozen=True)
class OpDraw:
    """One drawn RandAugment op: its name, level (magnitude / 10, in [0, mmax / 10]) and sign."""

    name: str
    level: float
    sign: float


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment on uint8 `(H, W, 3)`: `num_ops` ops drawn uniformly with replacement,
    each applied with probability `prob` at magnitude `M ~ N(magnitude, magnitude_std)` clipped to
    `[0, magnitude_max]` (re-drawn per application; `magnitude_std=inf` draws U(0, magnitude)).
    Signed ops (rotate, shear, translate, increasing enhancements) flip sign with probability 0.5.

    Geometric ops fill with `fill` and resample with `interpolation`: DeiT's `create_transform`
    call passes its bicubic train interpolation and `round(255 * mean)` to timm, which only falls
    back to a random bilinear/bicubic choice and grey 128 when those are not given.
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5
    increasing: bool = True
    magnitude_max: float = _LEVEL_DENOM
    fill: tuple[int, int, int] = IMAGENET_FILL
    interpolation: str = "bicubic"
    translate_pct: float = 0.45
    ops: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_ops < 0 or not 0.0 <= self.prob <= 1.0 or self.magnitude_std < 0:
            raise InputError(
                f"num_ops {self.num_ops}, prob {self.prob}, magnitude_std {self.magnitude_std}; "
                "expected num_ops >= 0, 0 <= prob <= 1 and magnitude_std >= 0"
            )
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise InputError(
                f"interpolation {self.interpolation!r}; PIL's affine transforms support only "
                "'nearest', 'bilinear' and 'bicubic'"
            )
        ops = RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "fill", tuple(int(c) for c in self.fill))

    @classmethod
    def from_string(
        cls,
        config: str,
        *,
        fill: tuple[int, int, int] = IMAGENET_FILL,
        interpolation: str = "bicubic",
    ) -> RandAugment:
        """Parses timm's `rand-m9-mstd0.5-inc1` strings: keys `m` (magnitude, default 10 as in
        timm), `n` (ops, 2), `mstd` (noise std, 0; above 100 means uniform), `mmax` (clip, 10),
        `inc` (increasing ops, 0) and `p` (per-op probability, 0.5).

        `inc0` turns increasing ops off, as in timm 1.0 (the older timm of the published runs
        read any `inc` value, 0 included, as true).
        """
        parts = config.split("-")
        if parts[0] != "rand":
            raise InputError(f"RandAugment config {config!r}; expected it to start with 'rand'")
        kw: dict = {"magnitude": _LEVEL_DENOM, "magnitude_std": 0.0, "increasing": False}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max"}
        names |= {"inc": "increasing", "p": "prob"}
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?|inf)", part)
            if match is None or match.group(1) not in names:
                raise InputError(
                    f"RandAugment config {config!r}: section {part!r} is not one of "
                    f"{', '.join(k + '<number>' for k in names)}"
                )
            key, value = match.groups()
            if key in ("n", "inc") and not value.isdigit():
                raise InputError(f"RandAugment config {config!r}: {key} needs an integer")
            number = float(value)
            if key == "mstd" and number > 100:
                number = math.inf
            kw[names[key]] = int(number) if key == "n" else bool(number) if key == "inc" else number
        return cls(**kw, fill=fill, interpolation=interpolation)

    def apply_op(
        self, img: np.ndarray, name: str, magnitude: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Applies op `name` (one of `self.ops` or its non-increasing twin) unconditionally at
        `magnitude` in `[0, 10]` to uint8 `(H, W, 3)`; `rng` only draws the sign of signed ops."""
        _check_image(img)
        if name not in _OPS:
            raise InputError(f"unknown RandAugment op {name!r}; expected one of {sorted(_OPS)}")
        sign = _draw_sign(name, rng)
        out = _OPS[name](Image.fromarray(img), magnitude / _LEVEL_DENOM, sign, self)
        return np.array(out, dtype=np.uint8)

    def _sample_magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return float(min(max(m, 0.0), self.magnitude_max))

    def draw(self, rng: np.random.Generator) -> list[OpDraw]:
        """The ops one image gets, in order: `num_ops` op indices, then per op whether it applies
        (probability `prob`), its magnitude and, for a signed op, its sign; the draws `augment`
        makes, in its order."""
        drawn = []
        for index in rng.integers(0, len(self.ops), size=self.num_ops):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self._sample_magnitude(rng) / _LEVEL_DENOM
            name = self.ops[int(index)]
            drawn.append(OpDraw(name, level, _draw_sign(name, rng)))
        return drawn

    def apply(self, pil: Image.Image, drawn: list[OpDraw]) -> Image.Image:
        """Runs the ops of `draw` on an RGB PIL image."""
        for op in drawn:
            pil = _OPS[op.name](pil, op.level, op.sign, self)
        return pil

    def augment(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        """`__call__` on an RGB PIL image, without the array round trips (same draws)."""
        return self.apply(pil, self.draw(rng))

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augments uint8 `(H, W, 3)`, returning a new uint8 `(H, W, 3)` array."""
        _check_image(img)
        return np.array(self.augment(Image.fromarray(img), rng), dtype=np.uint8)
