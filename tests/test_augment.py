"""Device-side augmentation: hand-computed values, invariances and jit-ability on tiny batches."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ErasingConfig,
    MixupConfig,
    cutmix_box,
    mix_with_lambda,
    mixup_cutmix,
    normalize,
    random_erasing,
    smooth_one_hot,
)

K = 5
LABELS = jnp.array([0, 1, 2, 3])  # y[i] != y[::-1][i], so targets[i, y[i]] is lambda itself
# Jitted once: eager vmapped ops dispatch one by one and make the tests slow.
erase = jax.jit(random_erasing, static_argnums=2)
mix = jax.jit(mixup_cutmix, static_argnums=(3, 4))


def _constant_images(b: int = 4, h: int = 8, w: int = 8, c: int = 3) -> jax.Array:
    # Image i is filled with i + 1: any pixel tells which image it came from.
    return jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, h, w, c))


def test_normalize_hand_values():
    pixel = np.array([0, 255, 51], np.uint8)  # 51 / 255 = 0.2
    images = np.broadcast_to(pixel, (1, 2, 2, 3))
    expected = [
        (0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
        (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    out = normalize(jnp.asarray(images))
    assert out.dtype == jnp.float32 and out.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(out[0, 1, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(normalize(jnp.asarray(images, jnp.float32)), out, rtol=1e-6)
    custom = normalize(jnp.asarray(images), mean=(0.5,) * 3, std=(0.5,) * 3)
    np.testing.assert_allclose(custom[0, 0, 0], [-1.0, 1.0, (0.2 - 0.5) / 0.5], rtol=1e-6)


def test_smooth_one_hot_values_and_rows_sum_to_one():
    t = smooth_one_hot(jnp.array([2, 0]), 4, 0.1)
    # off = 0.1 / 4 = 0.025, on = 1 - 0.1 + 0.025 = 0.925 (timm's mixup_target)
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(smooth_one_hot(jnp.array([1]), 3), [[0.0, 1.0, 0.0]])


def test_mix_with_lambda_one_is_identity():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 3))
    out, targets = mix_with_lambda(x, LABELS, K, 1.0, smoothing=0.1)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_allclose(targets, smooth_one_hot(LABELS, K, 0.1))


def test_mix_with_lambda_mixup_and_cutmix_values():
    x = _constant_images()
    out, targets = mix_with_lambda(x, LABELS, K, 0.25)
    # Image 0 (value 1) blended with image 3 (value 4): 0.25 * 1 + 0.75 * 4.
    np.testing.assert_allclose(out[0], 3.25)
    np.testing.assert_allclose(targets[0], [0.25, 0.0, 0.0, 0.75, 0.0])
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    box = (jnp.int32(2), jnp.int32(6), jnp.int32(0), jnp.int32(4))  # 4 x 4 of 8 x 8
    out, targets = mix_with_lambda(x, LABELS, K, 0.75, box=box, smoothing=0.1)
    np.testing.assert_array_equal(out[1, 2:6, 0:4], 3.0)  # from image 2
    np.testing.assert_array_equal(out[1, :2], 2.0)
    np.testing.assert_array_equal(out[1, 2:6, 4:], 2.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_box_lambda_is_the_kept_fraction(seed):
    h, w = 8, 10
    (top, bottom, left, right), lam = cutmix_box(jax.random.PRNGKey(seed), h, w, 0.3)
    assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
    assert float(lam) == pytest.approx(1 - int((bottom - top) * (right - left)) / (h * w))
    # Before clipping the box is 2 * (int(size * sqrt(0.7)) // 2) on each side (timm rand_bbox).
    assert int(bottom - top) <= 2 * (int(h * math.sqrt(0.7)) // 2)
    assert int(right - left) <= 2 * (int(w * math.sqrt(0.7)) // 2)


def _lam_from_targets(targets: jax.Array) -> np.ndarray:
    return np.asarray(targets)[np.arange(4), np.asarray(LABELS)]


def test_cutmix_lambda_equals_fraction_of_pixels_that_stayed():
    x = _constant_images()
    cfg = MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    lams = []
    for seed in range(8):
        out, targets = mix(jax.random.PRNGKey(seed), x, LABELS, K, cfg)
        stayed = np.mean(np.asarray(out == x)[..., 0], axis=(1, 2))  # per image
        lam = _lam_from_targets(targets)
        np.testing.assert_allclose(stayed, lam, atol=1e-6)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        lams.append(lam[0])
    assert min(lams) < 1.0  # the boxes were not all empty


def test_mixup_only_blends_with_the_flipped_batch():
    x = _constant_images()
    cfg = MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    out, targets = mixup_cutmix(jax.random.PRNGKey(3), x, LABELS, K, cfg)
    lam = _lam_from_targets(targets)[:, None, None, None]
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0),
        MixupConfig(prob=0.0),
    ],
)
def test_mixup_disabled_is_identity_with_smoothed_targets(cfg):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
    out, targets = mixup_cutmix(jax.random.PRNGKey(0), x, LABELS, K, cfg)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_allclose(targets, smooth_one_hot(LABELS, K, 0.1))


def test_mixup_cutmix_defaults_deterministic_rows_sum_to_one_and_jit():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
    key = jax.random.PRNGKey(7)
    a = mixup_cutmix(key, x, LABELS, K)
    b = mixup_cutmix(key, x, LABELS, K)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    jitted = jax.jit(functools.partial(mixup_cutmix, num_classes=K, cfg=MixupConfig()))
    c = jitted(key, x, LABELS)
    np.testing.assert_allclose(c[0], a[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c[1], a[1], rtol=1e-5, atol=1e-6)
    for seed in range(6):
        _, targets = jitted(jax.random.PRNGKey(seed), x, LABELS)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_random_erasing_prob_zero_is_identity():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))
    out = random_erasing(jax.random.PRNGKey(1), x, ErasingConfig(prob=0.0))
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_erases_one_rectangle_of_bounded_area(mode):
    b, h, w = 6, 32, 24
    cfg = ErasingConfig(prob=1.0, mode=mode)
    x = jnp.ones((b, h, w, 3))  # erased pixels become noise or 0, never exactly 1
    out = np.asarray(erase(jax.random.PRNGKey(2), x, cfg))
    changed = np.any(out != 1.0, axis=-1)
    for i in range(b):
        rows, cols = np.flatnonzero(changed[i].any(1)), np.flatnonzero(changed[i].any(0))
        assert rows.size and cols.size, f"image {i} not erased"
        bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed[i].sum() == bh * bw  # a solid rectangle
        assert bh < h and bw < w  # timm's fit condition
        # Sides are rounded from sqrt(area * aspect) and sqrt(area / aspect), so the drawn area
        # lies in [(bh - 1/2)(bw - 1/2), (bh + 1/2)(bw + 1/2)].
        assert (bh - 0.5) * (bw - 0.5) <= cfg.max_area * h * w
        assert (bh + 0.5) * (bw + 0.5) >= cfg.min_area * h * w
        if mode == "const":
            assert np.all(out[i][changed[i]] == 0.0)


def test_random_erasing_is_deterministic_and_per_image():
    x = jnp.zeros((4, 16, 16, 3))
    key = jax.random.PRNGKey(5)
    cfg = ErasingConfig(prob=1.0)
    a, b = erase(key, x, cfg), erase(key, x, cfg)
    np.testing.assert_array_equal(a, b)
    masks = np.asarray(a != 0).any(-1)
    assert len({m.tobytes() for m in masks}) > 1  # boxes differ between images
    many = jnp.zeros((32, 8, 8, 1))
    erased = np.asarray(erase(key, many, ErasingConfig()) != 0).any(axis=(1, 2, 3)).sum()
    assert 1 <= erased <= 16  # default p 0.25: about 8 of 32


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MixupConfig(mixup_alpha=-1.0), "mixup_alpha -1.0"),
        (lambda: MixupConfig(prob=1.5), "prob 1.5"),
        (lambda: MixupConfig(switch_prob=-0.1), "switch_prob -0.1"),
        (lambda: MixupConfig(label_smoothing=1.0), "label_smoothing 1.0"),
        (lambda: ErasingConfig(prob=2.0), "erasing prob 2.0"),
        (lambda: ErasingConfig(min_area=0.5, max_area=0.1), "erasing area"),
        (lambda: ErasingConfig(min_aspect=0.0), "erasing aspect"),
        (lambda: ErasingConfig(min_aspect=2.0, max_aspect=1.0), "erasing aspect"),
        (lambda: ErasingConfig(mode="zero"), "erasing mode 'zero'"),
        (lambda: smooth_one_hot(LABELS, K, 1.0), "smoothing 1.0"),
    ],
)
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
