"""Device-side augmentation: hand-computed values, invariances and jit-ability on tiny batches,
and the live references: timm's `Mixup` (batch mode), `mixup_target`, `rand_bbox` /
`cutmix_bbox_and_lam` and `RandomErasing`, called at test time."""

from __future__ import annotations

import functools
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup
from timm.data.random_erasing import RandomErasing

from deit.data.device import (
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
    assert len({m.tobytes() for m in masks}) == 4  # each image gets its own box
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


# ---------------------------------------------------------------------------------------------
# Live references: timm's mixup / cutmix


def _nchw(x: jax.Array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _ks_bound(n: int, m: int, alpha: float = 1e-4) -> float:
    # The asymptotic critical value c(alpha) * sqrt((n + m) / (n m)); conservative for the
    # discrete (integer box) distributions below. Seeds are fixed, so alpha is the chance that
    # an unlucky seed was committed, not a per-run flake rate.
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _binomial_bound(p: float, n: int, m: int, sigmas: float = 4.5) -> float:
    # Tolerance on the difference of two frequencies of an event of probability p.
    return sigmas * math.sqrt(max(p * (1 - p), 1e-3) * (1 / n + 1 / m))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_equal_timm_mixup_target(smoothing: float):
    labels = np.random.default_rng(0).integers(0, 10, 8)
    for lam in (0.0, 0.3, 0.71828, 1.0):
        _, ours = mix_with_lambda(
            jnp.zeros((8, 2, 2, 1)), jnp.asarray(labels), 10, lam, None, smoothing
        )
        theirs = timm_mixup.mixup_target(torch.from_numpy(labels), 10, lam, smoothing)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-6)


class _FixedCentre:
    """Returns a given (cy, cx) from both implementations' centre draws, recording the ranges
    they draw from: timm's `np.random.randint(0, H)` / `(0, W)`, our `jax.random.randint`."""

    def __init__(self, cy: int, cx: int) -> None:
        self.values, self.ranges = [cy, cx], []

    def numpy(self, low: int, high: int, size=None) -> int:
        self.ranges.append((low, high))
        return self.values[(len(self.ranges) - 1) % 2]

    def jax(self, key, shape, minval, maxval) -> jax.Array:
        self.ranges.append((int(minval), int(maxval)))
        return jnp.int32(self.values[(len(self.ranges) - 1) % 2])


@pytest.mark.parametrize(("h", "w"), [(7, 10), (8, 8)])
def test_cutmix_box_and_lambda_equal_timm(h: int, w: int, monkeypatch: pytest.MonkeyPatch):
    """For every centre and a few lambdas (odd and even sides, boxes clipped at every border):
    the same box as timm's `cutmix_bbox_and_lam` and its corrected lambda."""
    for lam in (0.1, 0.36, 0.5, 0.77, 0.95):
        for cy in range(h):
            for cx in range(w):
                centre = _FixedCentre(cy, cx)
                monkeypatch.setattr(np.random, "randint", centre.numpy)
                box, lam_t = timm_mixup.cutmix_bbox_and_lam((2, 3, h, w), lam, correct_lam=True)
                monkeypatch.setattr(jax.random, "randint", centre.jax)
                ours, lam_o = cutmix_box(jax.random.PRNGKey(0), h, w, lam)
                monkeypatch.undo()
                assert tuple(int(b) for b in ours) == tuple(int(b) for b in box), (lam, cy, cx)
                assert float(lam_o) == pytest.approx(lam_t, abs=1e-6)
                assert centre.ranges == [(0, h), (0, w)] * 2  # timm's draws, then ours


def test_mixed_batches_equal_timm_batch_mode(monkeypatch: pytest.MonkeyPatch):
    """timm's `Mixup` in batch mode with its lambda, method and centre fixed, against ours with
    the same values: image i pairs with image B-1-i in both (timm's `x.flip(0)`, our
    `x[::-1]`); timm is NCHW, we are NHWC."""
    b, h, w, k = 6, 7, 10, 10
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, 3))
    labels = np.array([3, 1, 4, 1, 5, 9])
    mixer = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=k)
    for lam, use_cutmix in ((0.62, False), (0.62, True), (0.2, True)):
        monkeypatch.setattr(mixer, "_params_per_batch", lambda lam=lam, c=use_cutmix: (lam, c))
        centre = _FixedCentre(5, 2)  # the box crosses the bottom border
        monkeypatch.setattr(np.random, "randint", centre.numpy)
        x_t, y_t = mixer(_nchw(x), torch.from_numpy(labels))
        box = None
        if use_cutmix:
            monkeypatch.setattr(jax.random, "randint", centre.jax)
            box, lam = cutmix_box(jax.random.PRNGKey(0), h, w, lam)
        monkeypatch.undo()
        x_o, y_o = mix_with_lambda(x, jnp.asarray(labels), k, lam, box=box, smoothing=0.1)
        np.testing.assert_allclose(_nchw(x_o).numpy(), x_t.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y_o, y_t.numpy(), rtol=0, atol=1e-6)


def _classify_mixes(mixed0: np.ndarray, lam: np.ndarray) -> np.ndarray:
    # Image 0 is zeros, image 1 ones, so mixed image 0 shows what happened: untouched (lam 1,
    # which an empty cutmix box also gives), cutmix (only 0s and 1s), or mixup (1 - lam).
    binary = np.all((mixed0 == 0) | (mixed0 == 1), axis=tuple(range(1, mixed0.ndim)))
    return np.where(lam == 1.0, 0, np.where(binary, 1, 2))


def test_mixup_cutmix_random_choices_match_timm():
    """Over many draws: how often a batch is left alone, cutmixed or mixed up, and the
    distribution of lambda (Beta for mixup, box-corrected for cutmix), against timm's `Mixup`."""
    n, k = 4000, 3
    cfg = MixupConfig(
        mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5, label_smoothing=0
    )
    x = np.stack([np.zeros((8, 8, 1), np.float32), np.ones((8, 8, 1), np.float32)])
    labels = np.array([0, 1])
    draw = jax.jit(jax.vmap(lambda key: mixup_cutmix(key, x, labels, k, cfg)))
    mixed, targets = draw(jax.random.split(jax.random.PRNGKey(0), n))
    lam_o = np.asarray(targets[:, 0, 0])
    kind_o = _classify_mixes(np.asarray(mixed[:, 0]), lam_o)

    np.random.seed(0)
    mixer = timm_mixup.Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.prob,
        switch_prob=cfg.switch_prob,
        label_smoothing=0.0,
        num_classes=k,
    )
    lam_t, mixed_t = [], []
    for _ in range(n):
        out, y = mixer(_nchw(x), torch.tensor([0, 1]))
        lam_t.append(float(y[0, 0]))
        mixed_t.append(out[0].numpy())
    lam_t = np.asarray(lam_t, np.float32)
    kind_t = _classify_mixes(np.stack(mixed_t), lam_t)

    for kind, p in ((0, 0.2), (1, 0.4), (2, 0.4)):  # none (+ empty boxes), cutmix, mixup
        f_o, f_t = np.mean(kind_o == kind), np.mean(kind_t == kind)
        assert abs(f_o - f_t) <= _binomial_bound(p, n, n), (kind, f_o, f_t)
        a, b = lam_o[kind_o == kind], lam_t[kind_t == kind]
        if kind:
            assert _ks_distance(a, b) <= _ks_bound(a.size, b.size), kind
    # mixup images are 1 - lam everywhere, the pairing the targets claim
    mix = kind_o == 2
    np.testing.assert_allclose(np.asarray(mixed)[mix, 0, 0, 0, 0], 1 - lam_o[mix], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Live reference: timm's RandomErasing


def _erased_boxes(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (NHWC): whether it was erased and the (height, width) of its box, checking on
    the way that only one solid rectangle changed."""
    changed = np.any(after != before, axis=-1)
    erased, sides = changed.any(axis=(1, 2)), np.zeros((len(after), 2), np.int64)
    for i in np.flatnonzero(erased):
        rows, cols = np.flatnonzero(changed[i].any(1)), np.flatnonzero(changed[i].any(0))
        bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed[i].sum() == bh * bw, f"image {i}: the changed pixels are not a rectangle"
        sides[i] = bh, bw
    return erased, sides


def test_random_erasing_matches_timm_in_distribution():
    """Same settings, many images: the erasing frequency, the distributions of the box's area
    fraction, aspect and height, and N(0, 1) per-pixel noise inside the box, unerased pixels
    untouched. The image is 16 x 48 so a swapped height and width would change which draws fit
    (timm keeps the first of 10 that fits strictly inside) and so the distributions."""
    n, h, w = 3000, 16, 48
    cfg = ErasingConfig(prob=0.5, min_area=0.02, max_area=1 / 3, min_aspect=0.3, mode="pixel")
    sentinel = 7.0  # never drawn as noise
    x = np.full((n, h, w, 3), sentinel, np.float32)
    ours = np.asarray(erase(jax.random.PRNGKey(0), x, cfg))

    random.seed(0)
    torch.manual_seed(0)
    eraser = RandomErasing(
        probability=cfg.prob,
        min_area=cfg.min_area,
        max_area=cfg.max_area,
        min_aspect=cfg.min_aspect,
        mode="pixel",
        device="cpu",
    )
    theirs = eraser(torch.full((n, 3, h, w), sentinel)).numpy().transpose(0, 2, 3, 1)

    before = np.full((1, h, w, 3), sentinel)
    (erased_o, sides_o), (erased_t, sides_t) = (
        _erased_boxes(before, ours),
        _erased_boxes(before, theirs),
    )
    f_o, f_t = erased_o.mean(), erased_t.mean()
    assert abs(f_o - cfg.prob) <= _binomial_bound(cfg.prob, n, 10**9)
    assert abs(f_o - f_t) <= _binomial_bound(cfg.prob, n, n)
    so, st = sides_o[erased_o], sides_t[erased_t]
    stats = {
        "area": lambda s: s[:, 0] * s[:, 1] / (h * w),
        "log aspect": lambda s: np.log(s[:, 0] / s[:, 1]),
        "height": lambda s: s[:, 0],
    }
    for name, stat in stats.items():
        d = _ks_distance(stat(so), stat(st))
        assert d <= _ks_bound(len(so), len(st)), (name, d)
    assert np.all(sides_o[erased_o] < (h, w))  # strictly inside, timm's fit rule
    # Erased pixels: standard normal noise drawn per pixel and channel, not one colour per box
    # ("rand" mode) or per pixel: the spread inside one box is that of the whole pool.
    for out in (ours, theirs):
        noise = out[out != sentinel]
        assert abs(noise.mean()) < 5 / math.sqrt(noise.size)
        assert abs(noise.std() - 1) < 5 / math.sqrt(2 * noise.size)
        inside = [out[i][out[i, ..., 0] != sentinel] for i in range(n)]
        inside = [v for v in inside if len(v) >= 20]
        assert np.mean([v.std(axis=0).mean() for v in inside]) > 0.9
