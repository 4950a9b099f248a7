"""3-Augment (`deit.data.three_augment`) against the official definition (facebookresearch/deit
`augment.py`, `new_data_aug_generator`): its op set and probabilities, statistically with a fixed
seed; each op, the jitter and the simple random crop against torchvision's own transforms with
the same parameters; and the pipeline's determinism over workers and resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from deit import data
from deit.data import three_augment as ta

N = 6000  # draws; the tolerances below are about 4 standard deviations at this count


def _image(seed: int = 0, h: int = 20, w: int = 28) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_op_set_and_probabilities_are_the_official_ones():
    # RandomChoice([gray_scale(p=1), Solarization(p=1), GaussianBlur(p=1, 0.1, 2.)]), then
    # ColorJitter(0.3, 0.3, 0.3): one op each time, uniformly; radius U(0.1, 2); factors
    # U(0.7, 1.3) in a uniformly random order.
    assert ta.OPS == ("grayscale", "solarize", "gaussian_blur")
    rng = np.random.default_rng(0)
    draws = [ta.draw(rng, 0.3) for _ in range(N)]
    ops = np.bincount([d.op for d in draws], minlength=3) / N
    np.testing.assert_allclose(ops, 1 / 3, atol=0.025)  # sd 0.006
    radii = np.array([d.radius for d in draws if ta.OPS[d.op] == "gaussian_blur"])
    assert radii.min() >= 0.1 and radii.max() <= 2.0
    assert radii.mean() == pytest.approx(1.05, abs=0.05)  # sd 0.012
    assert radii.std() == pytest.approx(1.9 / np.sqrt(12), abs=0.03)
    assert all(d.radius == 0.0 for d in draws if ta.OPS[d.op] != "gaussian_blur")
    factors = np.array([d.factors for d in draws])
    assert factors.min() >= 0.7 and factors.max() <= 1.3
    np.testing.assert_allclose(factors.mean(axis=0), 1.0, atol=0.01)  # sd 0.0022
    orders = [d.order for d in draws]
    for perm in itertools.permutations(range(3)):
        assert orders.count(perm) / N == pytest.approx(1 / 6, abs=0.02)  # sd 0.0048
    # --color-jitter 0 (the official `not args.color_jitter == 0` test): no jitter at all
    assert ta.draw(np.random.default_rng(0), 0.0).order == ()


def test_each_op_and_the_jitter_equal_torchvision_with_the_same_parameters():
    pil = Image.fromarray(_image())
    gray = ta.apply(pil, ta.ThreeAugmentDraw(0, 0.0, (), ()))
    np.testing.assert_array_equal(np.asarray(gray), np.asarray(T.Grayscale(3)(pil)))
    sol = ta.apply(pil, ta.ThreeAugmentDraw(1, 0.0, (), ()))
    np.testing.assert_array_equal(np.asarray(sol), np.asarray(TF.solarize(pil, 128)))
    # blur, then jitter in the order (saturation, brightness, contrast)
    drawn = ta.ThreeAugmentDraw(2, 1.3, (2, 0, 1), (0.8, 1.2, 0.75))
    ref = pil.filter(ImageFilter.GaussianBlur(radius=1.3))
    ref = TF.adjust_saturation(ref, 0.75)
    ref = TF.adjust_brightness(ref, 0.8)
    ref = TF.adjust_contrast(ref, 1.2)
    np.testing.assert_array_equal(np.asarray(ta.apply(pil, drawn)), np.asarray(ref))


@pytest.mark.parametrize("shape", [(20, 28), (30, 16)])
def test_simple_random_crop_equals_torchvision_resize_pad_crop(shape):
    img = _image(1, *shape)
    size = 16
    rng = np.random.default_rng(5)
    tops, lefts, flips = [], [], 0
    for _ in range(300):
        seed = int(rng.integers(1 << 30))
        out = np.asarray(ta.simple_random_crop(img, np.random.default_rng(seed), size))
        replay = np.random.default_rng(seed)
        resized = TF.resize(Image.fromarray(img), size, T.InterpolationMode.BICUBIC)
        padded = TF.pad(resized, 4, padding_mode="reflect")
        top = int(replay.integers(0, padded.height - size + 1))
        left = int(replay.integers(0, padded.width - size + 1))
        ref = TF.crop(padded, top, left, size, size)
        if replay.random() < 0.5:
            ref, flips = TF.hflip(ref), flips + 1
        np.testing.assert_array_equal(out, np.asarray(ref))
        tops.append(top)
        lefts.append(left)
    # every offset of the padded image is reachable: 0..8 on the short side
    assert set(tops if shape[0] < shape[1] else lefts) == set(range(9))
    assert flips / 300 == pytest.approx(0.5, abs=0.12)


def _source(n: int = 24) -> data.Source:
    pixels = np.random.default_rng(0).integers(0, 255, (n, 12, 10, 3), dtype=np.uint8)
    return data.arrays(pixels, np.arange(n) % 4)


def _cfg(**kw) -> data.DataConfig:
    base = dict(img_size=16, three_augment=True, repeats=1, workers=0, scale=(0.5, 1.0))
    return data.DataConfig(**{**base, **kw})


def test_pipeline_batches_are_deterministic_over_workers_and_resume():
    # the simple random crop with a worker process (the random-resized one is host's, tested
    # with workers in test_data_pipeline); resume and repeat with both
    train, val = _source(), _source(8)
    src = True
    kw = dict(seed=1, global_batch=8, epochs=2, start_step=2)
    base = list(data.run_batches(train, val, _cfg(src=src), **kw))
    again = list(data.run_batches(train, val, _cfg(src=src, workers=1), **kw))
    assert len(base) == len(again) > 0
    for (k, s, x), (k2, s2, y) in zip(base, again, strict=True):
        assert (k, s) == (k2, s2)
        np.testing.assert_array_equal(x["image"], y["image"])
    for src in (False, True):
        _check_resume_and_plain(train, src)


def _check_resume_and_plain(train: data.Source, src: bool) -> None:
    full = list(data.train_batches(train, _cfg(src=src), seed=1, global_batch=8, epochs=2))
    resumed = list(
        data.train_batches(train, _cfg(src=src), seed=1, global_batch=8, epochs=2, start_step=4)
    )
    for x, y in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    # 3-Augment, not RandAugment: other images than the default pipeline's
    plain = list(
        data.train_batches(train, _cfg(three_augment=False), seed=1, global_batch=8, epochs=1)
    )
    assert not np.array_equal(plain[0]["image"], full[0]["image"])


def test_three_augment_from_encoded_files_equals_from_arrays(tmp_path):
    img = _image(2, 40, 52)
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    for src in (False, True):
        a = ta.three_augment(img, np.random.default_rng(3), 16, src=src)
        b = ta.three_augment(path, np.random.default_rng(3), 16, src=src)
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"src .* expected three_augment"):
        data.DataConfig(src=True)
    with pytest.raises(ValueError, match=r"color_jitter -0\.1; expected"):
        data.DataConfig(color_jitter=-0.1)
    with pytest.raises(ValueError, match="three_augment runs on the host"):
        data.DataConfig(three_augment=True, decode="gpu")
