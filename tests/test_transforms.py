"""Per-image transforms: shapes on normal and tiny images, seeded determinism, crop geometry
against torchvision's sampler rules, and decoding of every PIL mode we expect to meet."""

from __future__ import annotations

import importlib.util
import io
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as timm_aa

from deit.data import host as transforms
from deit.data import randaugment
from deit.data.host import (
    IMAGENET_FILL,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugment,
    dct_scale,
    decode_image,
    eval_transform,
    hflip,
    random_resized_crop,
    random_resized_crop_box,
    train_transform,
    train_transform_encoded,
)

RA = "rand-m9-mstd0.5-inc1"


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# RandAugment


@pytest.mark.parametrize("name", sorted(set(RAND_INCREASING_TRANSFORMS) | set(RAND_TRANSFORMS)))
@pytest.mark.parametrize("shape", [(40, 56), (8, 8), (1, 1)])
@pytest.mark.parametrize("magnitude", [0.0, 9.0, 10.0])
def test_each_op_keeps_shape_and_dtype(name: str, shape: tuple[int, int], magnitude: float):
    img = _random_image(*shape)
    out = RandAugment().apply_op(img, name, magnitude, np.random.default_rng(0))
    assert out.shape == (*shape, 3)
    assert out.dtype == np.uint8


def test_op_lists_are_timms():
    assert RandAugment().ops == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert RandAugment(increasing=False).ops == tuple(timm_aa._RAND_TRANSFORMS)


class _FixedDraw:
    """Stands in for both random sources of a signed op: our `rng.random()` and the
    `random.random()` of timm's `_randomly_negate`. Both negate when the draw is above 0.5.
    Having no other method, it also proves no other draw (interpolation, magnitude) happens."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def _structured_image(h: int = 40, w: int = 56) -> np.ndarray:
    # Ramps plus noise inside [20, 230]: autocontrast and equalize have a range to stretch,
    # solarize thresholds fall inside it, and a non-square size tells x from y.
    ys, xs = np.mgrid[0:h, 0:w]
    ramps = np.stack([ys * 4.0, xs * 3.0, (ys + xs) * 2.0], -1) + 20
    noise = np.random.default_rng(0).normal(0, 12, (h, w, 3))
    return np.clip(ramps + noise, 20, 230).astype(np.uint8)


TIMM_RA_HPARAMS = {
    # What DeiT's create_transform hands timm: round(255 * mean) and the bicubic train resample.
    "img_mean": IMAGENET_FILL,
    "interpolation": Image.Resampling.BICUBIC,
    "translate_pct": 0.45,
    "magnitude_std": 0,
}


@pytest.mark.parametrize("name", sorted(set(timm_aa._RAND_INCREASING_TRANSFORMS)))
def test_each_op_is_bit_identical_to_timm(name: str, monkeypatch: pytest.MonkeyPatch):
    """timm's `AugmentOp` (prob 1, no magnitude noise) and our `apply_op` at fixed magnitudes and
    a fixed sign give the same uint8 image."""
    img = _structured_image()
    ra = RandAugment()
    for magnitude in (0.0, 2.5, 5.5, 9.0, 9.37, 10.0):
        for draw in (0.25, 0.75):  # keep the sign, then negate it
            monkeypatch.setattr(timm_aa, "random", _FixedDraw(draw))
            op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=TIMM_RA_HPARAMS)
            try:
                expected = np.asarray(op(Image.fromarray(img)))
            except ValueError:
                # Current PIL refuses posterize to 0 bits (increasing posterize at M = 10); the
                # black image is what the PIL of the published runs gave, and what we give.
                assert name == "PosterizeIncreasing" and magnitude == 10.0
                expected = np.zeros_like(img)
            got = ra.apply_op(img, name, magnitude, _FixedDraw(draw))
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} M={magnitude} {draw}")


@pytest.mark.parametrize(
    "name", sorted(set(timm_aa._RAND_TRANSFORMS) - set(RAND_INCREASING_TRANSFORMS))
)
def test_each_non_increasing_op_is_bit_identical_to_timm(name: str):
    img = _structured_image()
    for magnitude in (0.0, 2.5, 5.5, 10.0):
        op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=TIMM_RA_HPARAMS)
        try:
            expected = np.asarray(op(Image.fromarray(img)))
        except ValueError:  # posterize to int(4 * M / 10) = 0 bits, as above
            assert name == "Posterize" and magnitude < 2.5
            expected = np.zeros_like(img)
        got = RandAugment().apply_op(img, name, magnitude, _FixedDraw(0.0))
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} M={magnitude}")


@pytest.mark.parametrize(
    "config",
    ["rand-m9-mstd0.5-inc1", "rand-n3-m7-p0.3-mmax15", "rand-mstd101", "rand-m9-inc0", "rand-n1"],
)
def test_from_string_reads_configs_as_timm_does(config: str):
    ours = RandAugment.from_string(config)
    theirs = timm_aa.rand_augment_transform(config, {"img_mean": IMAGENET_FILL})
    assert ours.num_ops == theirs.num_layers
    assert ours.ops == tuple(op.name for op in theirs.ops)
    for op in theirs.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (
            ours.prob,
            ours.magnitude,
            ours.magnitude_std,
        )
        # timm leaves magnitude_max unset (None) and then clips at 10, our stored default
        assert (op.magnitude_max or 10) == ours.magnitude_max


def test_op_semantics_at_known_magnitudes():
    ra = RandAugment()
    rng = np.random.default_rng(0)
    img = _random_image(16, 16)
    np.testing.assert_array_equal(ra.apply_op(img, "Invert", 0, rng), 255 - img)
    # increasing posterize keeps 4 - int(4 * M / 10) bits: M=10 keeps none, M=5 keeps 2
    assert not ra.apply_op(img, "PosterizeIncreasing", 10, rng).any()
    np.testing.assert_array_equal(ra.apply_op(img, "PosterizeIncreasing", 5, rng), img & 0xC0)
    # increasing solarize threshold is 256 - int(256 * M / 10): M=0 inverts nothing
    np.testing.assert_array_equal(ra.apply_op(img, "SolarizeIncreasing", 0, rng), img)
    np.testing.assert_array_equal(ra.apply_op(img, "SolarizeIncreasing", 10, rng), 255 - img)
    # SolarizeAdd adds int(110 * M / 10) below 128, saturating at 255
    expected = np.where(img < 128, np.minimum(img.astype(int) + 110, 255), img)
    np.testing.assert_array_equal(ra.apply_op(img, "SolarizeAdd", 10, rng), expected)
    # zero magnitude leaves geometric ops and increasing enhancements at the identity
    for name in ("Rotate", "ShearX", "TranslateYRel", "BrightnessIncreasing"):
        np.testing.assert_array_equal(ra.apply_op(img, name, 0, rng), img)


def test_translate_fills_with_the_fill_colour():
    ra = RandAugment(fill=(1, 2, 3))
    img = np.full((10, 20, 3), 200, np.uint8)
    out = ra.apply_op(img, "TranslateXRel", 10, np.random.default_rng(0))
    # a shift of 0.45 of the width uncovers 9 columns on one side
    filled = np.all(out == (1, 2, 3), axis=-1).all(axis=0)
    assert filled.sum() == 9 and (filled[:9].all() or filled[-9:].all())


def test_randaugment_deterministic_per_seed():
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    img = _random_image(32, 32)
    a = ra(img, np.random.default_rng(7))
    b = ra(img, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    outs = [ra(img, np.random.default_rng(s)).tobytes() for s in range(8)]
    # Each op is skipped with probability 1/2, so about 1 in 4 seeds returns the image itself;
    # every other seed augments it its own way.
    changed = [o for o in outs if o != img.tobytes()]
    assert len(changed) >= 4 and len(set(changed)) == len(changed)
    assert a.shape == img.shape and a.dtype == np.uint8


def test_randaugment_tiny_image_and_prob_zero_is_identity():
    ra = RandAugment(num_ops=4, magnitude=10, magnitude_std=math.inf, prob=1.0)
    img = _random_image(8, 8)
    for seed in range(20):
        assert ra(img, np.random.default_rng(seed)).shape == (8, 8, 3)
    np.testing.assert_array_equal(RandAugment(prob=0.0)(img, np.random.default_rng(0)), img)


@pytest.mark.parametrize(
    "bad", ["rand-m9-x3", "augmix-m9", "rand-m", "rand-n2.5", "rand-m9-mstd0.5-inc1-w0", ""]
)
def test_from_string_rejects_bad_strings(bad: str):
    with pytest.raises(ValueError):
        RandAugment.from_string(bad)


# ---------------------------------------------------------------------------------------------
# Crops, flips, train and eval transforms


@pytest.mark.parametrize("size", [1, 16, 32, (24, 40), 224])
def test_random_resized_crop_shape(size):
    out = random_resized_crop(_random_image(60, 80), np.random.default_rng(0), size)
    expected = (size, size) if isinstance(size, int) else size
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_random_resized_crop_deterministic_per_seed():
    img = _random_image(50, 70)
    a = random_resized_crop(img, np.random.default_rng(3), 32)
    np.testing.assert_array_equal(a, random_resized_crop(img, np.random.default_rng(3), 32))
    outs = {random_resized_crop(img, np.random.default_rng(s), 32).tobytes() for s in range(8)}
    assert len(outs) == 8  # a different crop for every seed


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 0.5)])
def test_crop_box_within_scale_and_image(scale: tuple[float, float]):
    h, w = 400, 500
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, ch, cw = random_resized_crop_box(h, w, rng, scale, (3 / 4, 4 / 3))
        assert top >= 0 and left >= 0 and top + ch <= h and left + cw <= w
        # rounding each side to whole pixels moves the area by at most ~1/side relative
        assert scale[0] * 0.99 <= ch * cw / (h * w) <= scale[1] * 1.01
        assert 3 / 4 * 0.98 <= cw / ch <= 4 / 3 * 1.02


def test_crop_box_fallback_is_centred_with_clamped_ratio():
    # a 1x100 strip can never fit a box of ratio <= 4/3 covering 8% of it, so the fallback runs
    top, left, ch, cw = random_resized_crop_box(1, 100, np.random.default_rng(0))
    assert (top, ch, cw) == (0, 1, 1) and left == (100 - 1) // 2


def test_random_resized_crop_tiny_input():
    out = random_resized_crop(_random_image(8, 8), np.random.default_rng(0), 32)
    assert out.shape == (32, 32, 3)
    assert random_resized_crop(_random_image(1, 1), np.random.default_rng(0), 4).shape == (4, 4, 3)


def test_hflip():
    img = _random_image(5, 7)
    np.testing.assert_array_equal(hflip(img, np.random.default_rng(0), p=1.0), img[:, ::-1])
    np.testing.assert_array_equal(hflip(img, np.random.default_rng(0), p=0.0), img)
    flips = [hflip(img, np.random.default_rng(s)).tobytes() != img.tobytes() for s in range(200)]
    assert 60 < sum(flips) < 140


def test_train_transform_tiny_digits_like_input():
    img = np.repeat(_random_image(8, 8)[..., :1], 3, axis=-1)
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    a = train_transform(img, np.random.default_rng(1), 32, randaugment=ra)
    b = train_transform(img, np.random.default_rng(1), 32, randaugment=ra)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_train_transform_without_augmentation_is_a_resize():
    img = _random_image(20, 20)
    out = train_transform(
        img, np.random.default_rng(0), 20, scale=(1.0, 1.0), ratio=(1, 1), hflip=0
    )
    np.testing.assert_array_equal(out, img)


def test_eval_transform_crops_the_centre():
    h, w = 300, 200
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([ys * 255 / (h - 1), xs * 255 / (w - 1), np.zeros_like(ys)], -1)
    img = np.round(img).astype(np.uint8)
    out = eval_transform(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # shorter side 200 -> floor(224 / 0.875) = 256, longer 300 -> 384; crop offsets (80, 16)
    oy, ox = np.mgrid[0:224, 0:224]
    src_y = (80 + oy + 0.5) * h / 384 - 0.5
    src_x = (16 + ox + 0.5) * w / 256 - 0.5
    # bicubic reproduces linear ramps away from borders; allow for uint8 rounding twice
    np.testing.assert_allclose(out[..., 0], src_y * 255 / (h - 1), atol=2)
    np.testing.assert_allclose(out[..., 1], src_x * 255 / (w - 1), atol=2)


def test_eval_transform_tiny_input_and_crop_pct():
    assert eval_transform(_random_image(8, 8), 32).shape == (32, 32, 3)
    assert eval_transform(_random_image(30, 40), 16, crop_pct=1.0).shape == (16, 16, 3)
    img = _random_image(16, 16)
    np.testing.assert_array_equal(eval_transform(img, 16, crop_pct=1.0), img)


# ---------------------------------------------------------------------------------------------
# Decoding


def _save(tmp_path: Path, name: str, img: Image.Image, fmt: str) -> Path:
    path = tmp_path / name
    img.save(path, fmt)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("1", "PNG"), ("LA", "PNG")],
)
def test_decode_converts_modes_to_rgb(tmp_path: Path, mode: str, fmt: str):
    img = Image.fromarray(_random_image(6, 9)).convert(mode)
    path = _save(tmp_path, f"x.{fmt.lower()}", img, fmt)
    out = decode_image(path)
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    # torchvision's ImageFolder loader, which the reference reads images with
    with Image.open(path) as ref:
        np.testing.assert_array_equal(out, np.asarray(ref.convert("RGB")))


def test_decode_drops_alpha_like_torchvision(tmp_path: Path):
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    out = decode_image(_save(tmp_path, "a.png", img, "PNG"))
    np.testing.assert_array_equal(out, [[[10, 20, 30], [10, 20, 30]]])


def test_decode_palette_with_transparency_does_not_warn(tmp_path: Path):
    img = Image.new("P", (3, 2), 1)
    img.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    path = tmp_path / "p.png"
    img.save(path, "PNG", transparency=bytes([0, 255]))
    np.testing.assert_array_equal(decode_image(path), np.full((2, 3, 3), (9, 8, 7)))


def test_decode_16_bit_scales_instead_of_clipping(tmp_path: Path):
    img = Image.fromarray(np.array([[65535, 32768, 255, 0]], dtype=np.uint16))
    assert img.mode == "I;16"
    out = decode_image(_save(tmp_path, "deep.png", img, "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [255, 128, 0, 0])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_decode_one_pixel_and_bytes(tmp_path: Path):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (5, 6, 7)).save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), [[[5, 6, 7]]])
    path = tmp_path / "one.png"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(decode_image(str(path)), [[[5, 6, 7]]])


def test_decode_rejects_broken_files(tmp_path: Path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(_random_image(64, 64)).save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for path in (empty, text, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=re.escape(f"cannot decode image {path}:")):
            decode_image(path)


def test_decode_reports_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _save(tmp_path, "big.png", Image.new("L", (64, 64)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # errors above twice the limit
    with pytest.raises(ValueError, match="decompression-bomb"):
        decode_image(path)


# ---------------------------------------------------------------------------------------------
# The host path from encoded files (issue 27): the same draws, the same pixels


def _old_transforms():
    """bench/transforms_before.py: this module as it was before the encoded path (the old
    host path, kept verbatim for the benchmark) — "today's" output the new path must match."""
    path = Path(__file__).resolve().parents[1] / "bench" / "transforms_before.py"
    spec = importlib.util.spec_from_file_location("transforms_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("transforms_before", module)
    spec.loader.exec_module(module)
    return module


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs plus grain: JPEG has real work, and nothing is flat."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), float)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


ENCODINGS = {
    "jpeg 4:2:0": lambda im: _encoded(im, "JPEG", quality=90),
    "jpeg 4:4:4": lambda im: _encoded(im, "JPEG", quality=95, subsampling=0),
    "jpeg 4:2:2": lambda im: _encoded(im, "JPEG", quality=75, subsampling=1),
    "jpeg progressive": lambda im: _encoded(im, "JPEG", quality=85, progressive=True),
    "jpeg grey": lambda im: _encoded(im.convert("L"), "JPEG", quality=90),
    "jpeg cmyk": lambda im: _encoded(im.convert("CMYK"), "JPEG", quality=90),
    "png": lambda im: _encoded(im, "PNG"),
    "png palette": lambda im: _encoded(im.convert("P"), "PNG"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("simplejpeg", [True, False])
def test_encoded_path_is_bit_identical_to_the_old_path(
    encoding: str, simplejpeg: bool, monkeypatch: pytest.MonkeyPatch
):
    """With no DCT scaling (`dct=False`, or crops under twice the output) the encoded path gives
    exactly the old decode -> crop -> flip -> RandAugment output, from the same draws."""
    if simplejpeg:
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(transforms, "_simplejpeg", lambda: None)
    old = _old_transforms()
    data = ENCODINGS[encoding](_photo(75, 100))
    ra_old, ra_new = old.RandAugment.from_string(RA), RandAugment.from_string(RA)
    np.testing.assert_array_equal(decode_image(data), old.decode_image(data))
    for seed in range(12):
        for size, dct in ((32, False), (48, True), (40, False)):  # 48: every crop < 2 x 48
            want_rng, rng = np.random.default_rng(seed), np.random.default_rng(seed)
            want = old.train_transform(old.decode_image(data), want_rng, size, randaugment=ra_old)
            got = train_transform_encoded(data, rng, size, randaugment=ra_new, dct=dct)
            np.testing.assert_array_equal(got, want, err_msg=f"{encoding} seed {seed} {size}")
            assert rng.random() == want_rng.random()  # and the same number of draws
            from_array = train_transform(
                decode_image(data), np.random.default_rng(seed), size, randaugment=ra_new
            )
            np.testing.assert_array_equal(from_array, want)


def test_encoded_path_reads_paths_and_reports_bad_files(tmp_path: Path):
    path = tmp_path / "x.jpg"
    path.write_bytes(ENCODINGS["jpeg 4:2:0"](_photo(30, 40)))
    a = train_transform_encoded(path, np.random.default_rng(0), 16)
    b = train_transform_encoded(path.read_bytes(), np.random.default_rng(0), 16)
    np.testing.assert_array_equal(a, b)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (truncated, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=re.escape(f"cannot decode image {bad}:")):
            train_transform_encoded(bad, np.random.default_rng(0), 16)


def test_dct_scale_only_where_the_resize_still_shrinks():
    assert dct_scale(447, 500, 224, 224) == 1
    assert dct_scale(448, 448, 224, 224) == 2
    assert dct_scale(900, 1800, 224, 224) == 4
    assert dct_scale(4000, 3000, 224, 224) == 8
    assert dct_scale(2000, 300, 224, 224) == 1


def test_dct_scaled_decode_keeps_the_crop():
    """A large photo decoded at 1/2-1/8 gives the crop of the full decode: the same draws, the
    same box (a smooth image differs by under a grey level on average, so nothing shifted)."""
    base = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((1600, 1200), Image.Resampling.BICUBIC)
    data = _encoded(img, "JPEG", quality=95)
    scaled = 0
    for seed in range(24):
        rng_full, rng = np.random.default_rng(seed), np.random.default_rng(seed)
        full = train_transform_encoded(data, rng_full, 96, dct=False)
        got = train_transform_encoded(data, rng, 96)
        assert rng.random() == rng_full.random()
        scaled += not np.array_equal(got, full)
        assert np.abs(got.astype(float) - full).mean() < 1.0, seed
    assert scaled >= 20  # crops of 1200 px and more on a side are 2x 96 and more: nearly all


def test_simplejpeg_decodes_to_pils_pixels():
    pytest.importorskip("simplejpeg")
    for name in ("jpeg 4:2:0", "jpeg 4:4:4", "jpeg 4:2:2", "jpeg progressive", "jpeg grey"):
        data = ENCODINGS[name](_photo(61, 83, seed=1))
        fast = transforms._fast_jpeg(data)
        assert fast is not None, name
        with Image.open(io.BytesIO(data)) as ref:
            np.testing.assert_array_equal(fast, np.asarray(ref.convert("RGB")), err_msg=name)
    assert transforms._fast_jpeg(ENCODINGS["jpeg cmyk"](_photo(8, 8))) is None  # PIL's CMYK


# ---------------------------------------------------------------------------------------------
# The augmentation's distribution against timm's own samplers


def test_crop_boxes_follow_timms_distribution():
    """Area fraction, log aspect and position of our boxes against timm's
    `RandomResizedCropAndInterpolation.get_params` on a 500x375 image (two-sample KS tests)."""
    from scipy.stats import ks_2samp
    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)
    img = Image.new("RGB", (500, 375))
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    theirs = np.array(
        [RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(4000)]
    )
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_box(375, 500, rng, scale, ratio) for _ in range(4000)])

    def stats(boxes: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = boxes.T.astype(float)
        return {
            "area": h * w / (375 * 500),
            "log aspect": np.log(w / h),
            "centre y": (top + h / 2) / 375,
            "centre x": (left + w / 2) / 500,
        }

    for key, a in stats(ours).items():
        assert ks_2samp(a, stats(theirs)[key]).pvalue > 1e-3, key


def test_randaugment_draws_follow_timms():
    """Ops applied per image (2 layers at p 0.5), which ops, and their magnitudes (N(9, 0.5)
    clipped to [0, 10]) from `rand-m9-mstd0.5-inc1`, ours against timm's `RandAugment`."""
    from scipy.stats import chisquare, ks_2samp

    img = Image.new("RGB", (4, 4))
    theirs = timm_aa.rand_augment_transform(RA, {"img_mean": IMAGENET_FILL})
    seen_theirs: list[list[tuple[str, float]]] = []
    for op in theirs.ops:
        op.level_fn = lambda m, hp, name=op.name: seen_theirs[-1].append((name, m)) or ()
        op.aug_fn = lambda im, *a, **k: im
    random.seed(0)
    np.random.seed(0)
    for _ in range(3000):
        seen_theirs.append([])
        theirs(img)
    ours = RandAugment.from_string(RA)
    seen_ours: list[list[tuple[str, float]]] = []
    patched = {
        name: (lambda im, f, rng, ra, name=name: seen_ours[-1].append((name, 10 * f)) or im)
        for name in ours.ops
    }
    rng = np.random.default_rng(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(randaugment, "_OPS", patched)
        for _ in range(3000):
            seen_ours.append([])
            ours.augment(img, rng)
    for seen in (seen_ours, seen_theirs):
        counts = np.bincount([len(s) for s in seen], minlength=3)
        assert chisquare(counts, [750, 1500, 750]).pvalue > 1e-3
        names = [n for s in seen for n, _ in s]
        freq = [names.count(op) for op in ours.ops]
        assert chisquare(freq).pvalue > 1e-3
    mags_ours = np.array([m for s in seen_ours for _, m in s])
    mags_theirs = np.array([m for s in seen_theirs for _, m in s])
    assert ks_2samp(mags_ours, mags_theirs).pvalue > 1e-3
    assert abs(mags_ours.std() - mags_theirs.std()) < 0.05 and mags_ours.max() <= 10.0
