"""Host-side per-image transforms on uint8 `(H, W, 3)` numpy arrays (paper §6, Table 9 recipe).

Reproduces the pipeline the official DeiT code builds through timm's `create_transform`:
random-resized-crop (torchvision's sampler) -> horizontal flip -> RandAugment
(`rand-m9-mstd0.5-inc1`, timm's variant of Cubuk et al. 2019) for training, and
resize-shorter-side-to-`size / crop_pct` -> centre crop for evaluation. Normalisation, mixup and
random erasing happen later, on batches.

Every random draw comes from an explicit `np.random.Generator`, so one seeded generator per
(seed, epoch, index) makes a run exactly reproducible; the draws follow the reference's order
(crop box, flip, then RandAugment) though not its random streams.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if np.ndim(size) == 0 else size
    if h <= 0 or w <= 0:
        raise InputError(f"size {size}; expected positive sizes")
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's convert("L") clips 16-bit values at 255; keep the top byte instead. Mode "I" on
        # open almost always holds 16-bit PNG/PGM/TIFF data, so it is scaled the same way.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode in ("P", "PA") or "transparency" in img.info:
        # Going through RGBA avoids PIL's warning for palette transparency; alpha is then dropped.
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _simplejpeg() -> Any:
    """simplejpeg (libjpeg-turbo, decoding straight into numpy), or None when not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _fast_jpeg(data: bytes) -> np.ndarray | None:
    """uint8 `(H, W, 3)` through simplejpeg for a baseline/progressive YCbCr or grey JPEG, else
    None (anything it would not decode as PIL does: CMYK, odd files, warnings, no simplejpeg).

    Both wrap libjpeg-turbo with its default accurate IDCT and fancy upsampling, so the pixels are
    PIL's (`tests/test_transforms.py`); simplejpeg saves PIL's RGBX unpacking and the copy into
    numpy, which cost as much as the decode itself.
    """
    sj = _simplejpeg() if data[:2] == b"\xff\xd8" else None
    if sj is None:
        return None
    try:
        h, w, colorspace, _ = sj.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and h * w > limit):
            return None  # PIL converts CMYK its own way, and owns the bomb check
        return sj.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None  # PIL decides: it decodes what it can and words the error


def _decode_error(name: str, e: BaseException) -> InputError:
    if isinstance(e, Image.DecompressionBombError):
        return InputError(
            f"cannot decode image {name}: over the decompression-bomb limit of "
            f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels ({e})"
        )
    return InputError(f"cannot decode image {name}: {e}")


_DECODE_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


def _read(data: bytes | str | Path) -> tuple[str, bytes, Any]:
    """(name for errors, the bytes, what PIL opens: the path itself, so its errors name it)."""
    if isinstance(data, bytes):
        return f"<{len(data)} bytes>", data, io.BytesIO(data)
    try:
        return str(data), Path(data).read_bytes(), data
    except OSError as e:
        raise _decode_error(str(data), e) from e


def decode_image(data: bytes | str | Path) -> np.ndarray:
    """Decodes encoded bytes or an image file to uint8 `(H, W, 3)` RGB.

    Any PIL mode is accepted. Alpha is dropped without compositing, and CMYK/YCbCr use PIL's plain
    conversion, as torchvision's `ImageFolder` loader (`img.convert("RGB")`) does for the
    reference; EXIF orientation is likewise ignored. 16-bit images keep their top 8 bits. Plain
    JPEGs go through simplejpeg when it is installed, with PIL's pixels.

    Raises:
        ValueError: `cannot decode image {path}: {reason}` for missing, empty, truncated or
            non-image files and for images over PIL's decompression-bomb pixel limit.
    """
    name, raw, source = _read(data)
    fast = _fast_jpeg(raw)
    if fast is not None:
        return fast
    try:
        with Image.open(source) as img:
            img.load()  # decoding is lazy: only load() notices a truncated file
            return _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from e


# ---------------------------------------------------------------------------------------------
# Crops and flips


def random_resized_crop_box(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Samples a crop `(top, left, height, width)` inside an `h x w` image.

    torchvision's `RandomResizedCrop.get_params`: up to 10 draws of area fraction ~ U(scale) and
    log aspect ~ U(log ratio); the first box that fits wins, else a centre crop of the whole image
    with its aspect clamped into `ratio`.
    """
    if scale[0] > scale[1] or ratio[0] > ratio[1] or ratio[0] <= 0:
        raise InputError(f"scale {scale}, ratio {ratio}; expected (min, max) with ratio > 0")
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        # torchvision also rejects 0-sized boxes, which tiny inputs would otherwise produce
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Crops a random box (see `random_resized_crop_box`) of `(H, W, 3)` uint8 and resizes it to
    `size` (`(size, size, 3)` for an int), like timm's `RandomResizedCropAndInterpolation`."""
    _check_image(img)
    out_h, out_w = _hw(size)
    top, left, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
    # crop, then resize (not resize(box=...)): the filter clamps at the crop edge, as in torchvision
    crop = Image.fromarray(img[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((out_w, out_h), _resample(interpolation))).copy()


def _flip(img: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1]) if rng.random() < p else img


def hflip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors `(H, W, 3)` left-right with probability `p`, as `RandomHorizontalFlip` does."""
    _check_image(img)
    return _flip(img, rng, p)


def eval_transform(
    img: np.ndarray, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> np.ndarray:
    """Resizes the shorter side of `(H, W, 3)` uint8 to `floor(size / crop_pct)` keeping the aspect,
    then centre-crops `(size, size, 3)`: timm's `transforms_imagenet_eval` in centre mode.

    The longer side is truncated and the crop offset rounded as torchvision's `Resize` and
    `CenterCrop` do; a `crop_pct` above 1 pads with zeros as `CenterCrop` does.
    """
    _check_image(img)
    if crop_pct <= 0:
        raise InputError(f"crop_pct {crop_pct}; expected > 0")
    if np.ndim(size) != 0 or int(size) <= 0:
        raise InputError(f"size {size!r}; expected a positive int")
    size = int(size)
    short = math.floor(size / crop_pct)
    h, w = img.shape[:2]
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    out = np.asarray(Image.fromarray(img).resize((new_w, new_h), _resample(interpolation)))
    pad_h, pad_w = max(size - new_h, 0), max(size - new_w, 0)
    if pad_h or pad_w:
        pads = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        out = np.pad(out, pads)
        new_h, new_w = out.shape[:2]
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return out[top : top + size, left : left + size].copy()


# ---------------------------------------------------------------------------------------------
# RandAugment


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _enhance(kind: type, increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment) -> Image.Image:
        # "increasing" moves away from the identity factor 1.0 as M grows; the original maps M
        # linearly onto [0.1, 1.9], so there M=5 is the identity.
        factor = max(0.1, 1.0 + _signed(0.9 * f, rng)) if increasing else 1.8 * f + 0.1
        return kind(img).enhance(factor)

    return op


def _posterize(increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment) -> Image.Image:
        bits = int(4 * f)
        bits = 4 - bits if increasing else bits
        # Recent PIL refuses to keep 0 bits, which increasing M=10 asks for; masking by hand gives
        # the black image older PIL (the one timm's published runs used) produced.
        mask = (0xFF << (8 - bits)) & 0xFF
        return img.point([i & mask for i in range(256)] * 3)

    return op


def _solarize(increasing: bool) -> Callable:
    def op(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment) -> Image.Image:
        thresh = int(256 * f)
        return ImageOps.solarize(img, 256 - thresh if increasing else thresh)

    return op


def _solarize_add(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment):
    add = int(110 * f)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def _rotate(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment):
    degrees = _signed(30.0 * f, rng)
    return img.rotate(degrees, resample=_resample(ra.interpolation), fillcolor=ra.fill)


def _affine(coeffs: Callable[[float, Image.Image], tuple], max_level: float | None) -> Callable:
    def op(img: Image.Image, f: float, rng: np.random.Generator, ra: RandAugment) -> Image.Image:
        v = _signed(f * (ra.translate_pct if max_level is None else max_level), rng)
        return img.transform(
            img.size,
            Image.Transform.AFFINE,
            coeffs(v, img),
            resample=_resample(ra.interpolation),
            fillcolor=ra.fill,
        )

    return op


_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, f, rng, ra: ImageOps.autocontrast(img),
    "Equalize": lambda img, f, rng, ra: ImageOps.equalize(img),
    "Invert": lambda img, f, rng, ra: ImageOps.invert(img),
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
        out = _OPS[name](Image.fromarray(img), magnitude / _LEVEL_DENOM, rng, self)
        return np.array(out, dtype=np.uint8)

    def _sample_magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return float(min(max(m, 0.0), self.magnitude_max))

    def augment(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        """`__call__` on an RGB PIL image, without the array round trips (same draws)."""
        for index in rng.integers(0, len(self.ops), size=self.num_ops):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self._sample_magnitude(rng) / _LEVEL_DENOM
            pil = _OPS[self.ops[index]](pil, level, rng, self)
        return pil

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augments uint8 `(H, W, 3)`, returning a new uint8 `(H, W, 3)` array."""
        _check_image(img)
        return np.array(self.augment(Image.fromarray(img), rng), dtype=np.uint8)


def train_transform(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int | tuple[int, int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: RandAugment | None = None,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Random-resized-crop -> horizontal flip -> RandAugment on uint8 `(H, W, 3)`, giving
    `(size, size, 3)`: the order of timm's `transforms_imagenet_train` before normalisation."""
    _check_image(img)
    out_h, out_w = _hw(size)
    top, left, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
    crop = Image.fromarray(img[top : top + ch, left : left + cw])
    pil = crop.resize((out_w, out_h), _resample(interpolation))
    return _flip_and_augment(pil, rng, hflip, randaugment)


def _flip_and_augment(
    pil: Image.Image, rng: np.random.Generator, p: float, randaugment: RandAugment | None
) -> np.ndarray:
    # PIL mirrors in C; numpy's copy of a reversed view costs as much as a RandAugment op
    if p > 0 and rng.random() < p:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment is not None:
        pil = randaugment.augment(pil, rng)
    return np.array(pil, dtype=np.uint8)


# JPEG's DCT scaling (libjpeg's scale_denom, PIL's `draft`): 1/2, 1/4 or 1/8 of each side.
DCT_SCALES = (8, 4, 2)


def dct_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT reduction `s` (8, 4, 2, else 1) that leaves the crop box at least the
    output size on both sides, so that the resize after it still only shrinks."""
    for s in DCT_SCALES:
        if crop_h >= s * out_h and crop_w >= s * out_w:
            return s
    return 1


def train_transform_encoded(
    data: bytes | str | Path,
    rng: np.random.Generator,
    size: int | tuple[int, int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: RandAugment | None = None,
    interpolation: str = "bicubic",
    dct: bool = True,
) -> np.ndarray:
    """`train_transform(decode_image(data), ...)` from the encoded file: uint8 `(size, size, 3)`.

    The crop box is drawn from the file's full size with the same draws, so the augmentation's
    distribution is unchanged. Where the box is at least twice the output on both sides (and `dct`),
    a JPEG decodes at 1/2, 1/4 or 1/8 of its size through libjpeg's DCT scaling (PIL's `draft`,
    what DALI and FFCV do) and the same box, in the reduced image's coordinates, is resized from
    there: close to, not bit-identical with, the full decode. Everywhere else the output is
    bit-identical to `train_transform(decode_image(data), ...)`.

    Raises:
        ValueError: `cannot decode image ...`, as `decode_image`.
    """
    out_h, out_w = _hw(size)
    resample = _resample(interpolation)
    name, raw, source = _read(data)
    try:
        with Image.open(source) as img:
            w, h = img.size
            top, left, ch, cw = random_resized_crop_box(h, w, rng, scale, ratio)
            s = dct_scale(ch, cw, out_h, out_w) if dct and img.format == "JPEG" else 1
            if s > 1 and img.mode in ("RGB", "L"):
                drafted = img.draft(img.mode, (w // s, h // s))
                s = w / drafted[1][2] if drafted else 1  # the reduction PIL chose
            else:
                s = 1
            if s > 1:
                img.load()
                # the box in the reduced image: its pixel j covers [s j, s j + s) of the full one
                box = (left / s, top / s, (left + cw) / s, (top + ch) / s)
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                pil = rgb.resize((out_w, out_h), resample, box=box)
            else:
                crop = _decode_crop(img, raw, top, left, ch, cw)
                pil = crop.resize((out_w, out_h), resample)
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from e
    return _flip_and_augment(pil, rng, hflip, randaugment)


def _decode_crop(
    img: Image.Image, raw: bytes, top: int, left: int, ch: int, cw: int
) -> Image.Image:
    """The box of the full decode, with `decode_image`'s pixels, as an RGB PIL image."""
    arr = _fast_jpeg(raw) if img.format == "JPEG" else None
    if arr is not None:
        return Image.fromarray(arr[top : top + ch, left : left + cw])
    img.load()  # decoding is lazy: only load() notices a truncated file
    if img.mode == "RGB" and "transparency" not in img.info:
        return img.crop((left, top, left + cw, top + ch))  # in C, without a full-image array
    return Image.fromarray(_to_rgb(img)[top : top + ch, left : left + cw])
