"""The host's per-image work, run in grain's worker processes: decode and per-image augmentation
on uint8 `(H, W, 3)` (paper §6, Table 9 recipe). RandAugment's ops are in `data.randaugment`.

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
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deit.data.randaugment import (
    IMAGENET_FILL,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugment,
    _check_image,
    _resample,
)
from deit.errors import InputError

__all__ = [
    "DCT_SCALES",
    "IMAGENET_FILL",
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "RandAugment",
    "dct_scale",
    "decode_image",
    "eval_transform",
    "hflip",
    "random_resized_crop",
    "random_resized_crop_box",
    "train_transform",
    "train_transform_encoded",
]


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
