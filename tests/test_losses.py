"""DeiT losses against values worked out by hand, and against the live references on random
inputs: timm's `SoftTargetCrossEntropy` / `LabelSmoothingCrossEntropy`, torch's
`cross_entropy`, and the official DeiT `losses.py` `DistillationLoss` formulas written in torch.

Most hand-worked logits are `[0, ln 3]`, whose softmax is exactly `[1/4, 3/4]`, so every expected
number there is a short closed form in `math.log`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from deit.losses import (
    LossConfig,
    binary_cross_entropy,
    cross_entropy,
    deit_loss,
    hard_distillation,
    soft_distillation,
    soft_target_cross_entropy,
)

LN3 = math.log(3.0)
# Rows: softmax [1/4, 3/4] and [1/2, 1/2].
LOGITS = jnp.array([[0.0, LN3], [0.0, 0.0]])
TEACHER = jnp.array([[LN3, 0.0], [0.0, LN3]])  # softmax [3/4, 1/4] and [1/4, 3/4]
# KL([3/4, 1/4] || [1/4, 3/4]) and KL([1/4, 3/4] || [1/2, 1/2]), summed over the batch.
KL_ROW0 = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
KL_ROW1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
KL_SUM = KL_ROW0 + KL_ROW1


def test_soft_target_cross_entropy_hand_value():
    targets = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    # Row 0: -(0.5 ln 1/4 + 0.5 ln 3/4); row 1: -ln 1/2.
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) + math.log(2.0)) / 2
    assert float(soft_target_cross_entropy(LOGITS, targets)) == pytest.approx(expected, rel=1e-6)


def test_soft_target_cross_entropy_is_float32_for_bfloat16_logits():
    targets = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    loss = soft_target_cross_entropy(LOGITS.astype(jnp.bfloat16), targets)
    assert loss.dtype == jnp.float32
    # the bfloat16 logits are widened before the log-softmax, not after
    widened = LOGITS.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(loss) == float(soft_target_cross_entropy(widened, targets))


def test_cross_entropy_with_label_smoothing_hand_value():
    labels = jnp.array([1, 0])
    eps = 0.1
    # timm LabelSmoothingCrossEntropy: (1 - eps) * nll + eps * mean_k(-log p_k), per row.
    row0 = (1 - eps) * -math.log(0.75) + eps * -(math.log(0.25) + math.log(0.75)) / 2
    row1 = (1 - eps) * math.log(2.0) + eps * math.log(2.0)
    loss = cross_entropy(LOGITS, labels, label_smoothing=eps)
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_cross_entropy_without_smoothing_is_soft_ce_on_one_hot():
    labels = jnp.array([1, 0])
    one_hot = jax.nn.one_hot(labels, 2)
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    assert float(cross_entropy(LOGITS, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(soft_target_cross_entropy(LOGITS, one_hot)) == pytest.approx(expected, rel=1e-6)


def test_soft_distillation_both_reductions_hand_values():
    batchmean = soft_distillation(LOGITS, TEACHER, tau=1.0, reduction="batchmean")
    numel = soft_distillation(LOGITS, TEACHER, tau=1.0, reduction="numel")
    assert float(batchmean) == pytest.approx(KL_SUM / 2, rel=1e-6)  # / B
    assert float(numel) == pytest.approx(KL_SUM / 4, rel=1e-6)  # / (B * K), official
    assert float(numel) == pytest.approx(float(batchmean) / 2, rel=1e-6)  # K = 2
    assert float(soft_distillation(LOGITS, TEACHER, tau=1.0)) == float(numel)  # the default


def test_soft_distillation_temperature_hand_value():
    # At tau = 2 the teacher row [ln 3, 0] becomes [ln 3 / 2, 0]: softmax [r, 1 - r], r below.
    student = jnp.zeros((1, 2))
    teacher = jnp.array([[LN3, 0.0]])
    r = math.sqrt(3) / (1 + math.sqrt(3))
    kl = r * math.log(r / 0.5) + (1 - r) * math.log((1 - r) / 0.5)
    loss = soft_distillation(student, teacher, tau=2.0, reduction="batchmean")
    assert float(loss) == pytest.approx(4.0 * kl, rel=1e-5)  # times tau**2


@pytest.mark.parametrize("reduction", ["numel", "batchmean"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_soft_distillation_is_zero_when_teacher_is_student(reduction, tau):
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 4
    assert abs(float(soft_distillation(logits, logits, tau, reduction))) < 1e-6


def test_hard_distillation_is_cross_entropy_against_teacher_argmax():
    student = jnp.array([[0.0, LN3, 0.0], [1.0, 2.0, 3.0]])
    teacher = jnp.array([[0.0, 5.0, 1.0], [3.0, 0.0, -1.0]])  # argmax [1, 0]
    # Row 0: softmax [1/5, 3/5, 1/5] -> -ln 3/5; row 1: -log_softmax([1, 2, 3])[0].
    row1 = math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 1.0
    expected = (-math.log(0.6) + row1) / 2
    assert float(hard_distillation(student, teacher)) == pytest.approx(expected, rel=1e-6)
    ce = cross_entropy(student, jnp.array([1, 0]))
    assert float(hard_distillation(student, teacher)) == float(ce)


TARGETS = jnp.array([[0.5, 0.5], [1.0, 0.0]])
BASE = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) + math.log(2.0)) / 2  # soft CE of LOGITS
DIST = jnp.array([[0.0, 0.0], [0.0, LN3]])  # softmax [1/2, 1/2] and [1/4, 3/4]
BASE_DIST = (math.log(2.0) - math.log(0.25)) / 2  # soft CE of DIST against TARGETS


def test_deit_loss_none_is_soft_ce():
    loss, aux = deit_loss(LOGITS, None, TARGETS)
    assert float(loss) == pytest.approx(BASE, rel=1e-6)
    assert float(aux["base_loss"]) == float(loss) == float(aux["loss"])
    assert float(aux["kd_loss"]) == 0.0


def test_deit_loss_none_trains_both_heads():
    loss, aux = deit_loss(LOGITS, DIST, TARGETS, distillation="none")
    assert float(loss) == pytest.approx((BASE + BASE_DIST) / 2, rel=1e-6)
    assert float(aux["kd_loss"]) == 0.0


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_deit_loss_soft_combines_with_alpha(alpha):
    # DIST rows against TEACHER: KL([3/4, 1/4] || [1/2, 1/2]) and KL(p || p) = 0.
    kd_sum = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss, aux = deit_loss(LOGITS, DIST, TARGETS, TEACHER, distillation="soft", alpha=alpha)
    assert float(aux["base_loss"]) == pytest.approx(BASE, rel=1e-6)  # class head only
    assert float(aux["kd_loss"]) == pytest.approx(kd_sum / 4, rel=1e-5)  # numel: / (B * K)
    assert float(loss) == pytest.approx((1 - alpha) * BASE + alpha * kd_sum / 4, rel=1e-5)
    _, aux_bm = deit_loss(
        LOGITS, DIST, TARGETS, TEACHER, distillation="soft", soft_reduction="batchmean"
    )
    assert float(aux_bm["kd_loss"]) == pytest.approx(kd_sum / 2, rel=1e-5)


def test_deit_loss_hard_combines_with_alpha():
    # Teacher argmax [0, 1]; DIST log-probs: ln 1/2 and ln 3/4.
    kd = (math.log(2.0) - math.log(0.75)) / 2
    loss, aux = deit_loss(LOGITS, DIST, TARGETS, TEACHER, distillation="hard", alpha=0.3)
    assert float(aux["kd_loss"]) == pytest.approx(kd, rel=1e-6)
    assert float(loss) == pytest.approx(0.7 * BASE + 0.3 * kd, rel=1e-6)


def test_deit_loss_without_dist_head_distils_the_class_head():
    # Teacher argmax [0, 1]; LOGITS log-probs: ln 1/4 and ln 1/2.
    kd = (-math.log(0.25) + math.log(2.0)) / 2
    loss, aux = deit_loss(LOGITS, None, TARGETS, TEACHER, distillation="hard")
    assert float(aux["kd_loss"]) == pytest.approx(kd, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * BASE + 0.5 * kd, rel=1e-6)
    _, aux = deit_loss(LOGITS, None, TARGETS, TEACHER, config=LossConfig("soft", tau=1.0))
    assert float(aux["kd_loss"]) == pytest.approx(KL_SUM / 4, rel=1e-5)


def test_deit_loss_stops_teacher_gradient_and_jits():
    step = jax.jit(functools.partial(deit_loss, distillation="soft", soft_reduction="batchmean"))

    def total(student, teacher):
        return step(LOGITS, student, TARGETS, teacher)[0]

    g_student, g_teacher = jax.grad(total, argnums=(0, 1))(DIST, TEACHER)
    assert np.all(np.asarray(g_teacher) == 0.0)
    assert np.any(np.asarray(g_student) != 0.0)
    eager = deit_loss(LOGITS, DIST, TARGETS, TEACHER, distillation="soft")[0]
    jitted = jax.jit(lambda *a: deit_loss(*a, config=LossConfig("soft"))[0])(
        LOGITS, DIST, TARGETS, TEACHER
    )
    assert float(jitted) == pytest.approx(float(eager), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distillation": "kl"}, "distillation 'kl'"),
        ({"distillation": "soft", "alpha": 1.5}, "alpha 1.5"),
        ({"distillation": "soft", "alpha": -0.1}, "alpha -0.1"),
        ({"distillation": "soft", "tau": 0.0}, "tau 0.0"),
        ({"distillation": "soft", "soft_reduction": "mean"}, "'mean'"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deit_loss(LOGITS, DIST, TARGETS, TEACHER, **kwargs)
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="needs teacher_logits"):
        deit_loss(LOGITS, DIST, TARGETS, None, distillation="hard")
    with pytest.raises(ValueError, match="both config and loss settings"):
        deit_loss(LOGITS, DIST, TARGETS, TEACHER, alpha=0.1, config=LossConfig("hard"))
    with pytest.raises(ValueError, match="targets shape"):
        deit_loss(LOGITS, DIST, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="tau -1"):
        soft_distillation(LOGITS, TEACHER, tau=-1)
    with pytest.raises(ValueError, match="'sum'"):
        soft_distillation(LOGITS, TEACHER, tau=1.0, reduction="sum")
    with pytest.raises(ValueError, match=r"label_smoothing 1\.0"):
        cross_entropy(LOGITS, jnp.array([0, 1]), label_smoothing=1.0)


# ---------------------------------------------------------------------------------------------
# Live references on random inputs. The references run in float64, ours in float32.

B, K = 8, 10


def _random_logits(seed: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(B, K)) * scale).astype(np.float32)


def _soft_targets(seed: int) -> np.ndarray:
    # Mixup-like rows: positive, summing to one, not one-hot.
    t = np.random.default_rng(seed).gamma(0.3, size=(B, K)).astype(np.float32)
    return t / t.sum(-1, keepdims=True)


def _t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def _official_deit_loss(cls, dist, targets, teacher, distillation, alpha, tau):
    """DeiT `losses.py` `DistillationLoss.forward` with `SoftTargetCrossEntropy` as the base
    criterion (the official choice under mixup), on a model returning (class, dist) logits."""
    base = SoftTargetCrossEntropy()(cls, targets)
    if distillation == "none":
        return base, base, torch.zeros(())
    if distillation == "soft":
        kl = F.kl_div(
            F.log_softmax(dist / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        kd = kl * (tau * tau) / dist.numel()
    else:
        kd = F.cross_entropy(dist, teacher.argmax(dim=1))
    return base * (1 - alpha) + kd * alpha, base, kd


def test_soft_target_cross_entropy_equals_timm():
    logits, targets = _random_logits(0), _soft_targets(1)
    expected = SoftTargetCrossEntropy()(_t(logits), _t(targets)).item()
    ours = soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert float(ours) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_equals_timm_and_torch(smoothing: float):
    logits = _random_logits(2)
    labels = np.random.default_rng(3).integers(0, K, B)
    ours = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing))
    torch_ce = F.cross_entropy(_t(logits), torch.from_numpy(labels), label_smoothing=smoothing)
    assert ours == pytest.approx(torch_ce.item(), rel=1e-6)
    if smoothing > 0:  # timm's class asserts smoothing < 1 and > 0 is what it is for
        timm_ce = LabelSmoothingCrossEntropy(smoothing)(_t(logits), torch.from_numpy(labels))
        assert ours == pytest.approx(timm_ce.item(), rel=1e-6)


@pytest.mark.parametrize("distillation", ["soft", "hard", "none"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.5, 1.0), (0.1, 3.0), (0.9, 0.5)])
def test_deit_loss_equals_official_distillation_loss(distillation: str, alpha: float, tau: float):
    """Loss, its two parts and the gradients into both heads, for a distilled model on random
    logits and mixup-like targets. "none" on a model with a distillation head is compared
    with the official head-less form; see the next test for the two-head case."""
    cls, dist, teacher = _random_logits(4), _random_logits(5), _random_logits(6, scale=4.0)
    targets = _soft_targets(7)

    def ours_fn(c, d):
        head = d if distillation != "none" else None
        kw = {"distillation": distillation, "alpha": alpha, "tau": tau}
        return deit_loss(c, head, jnp.asarray(targets), jnp.asarray(teacher), **kw)

    (loss, aux), grads = jax.value_and_grad(ours_fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(cls), jnp.asarray(dist)
    )
    c_t, d_t = _t(cls, grad=True), _t(dist, grad=True)
    ref, base, kd = _official_deit_loss(
        c_t, d_t, _t(targets), _t(teacher), distillation, alpha, tau
    )
    ref.backward()
    assert float(loss) == pytest.approx(ref.item(), rel=1e-6)
    assert float(aux["base_loss"]) == pytest.approx(base.item(), rel=1e-6)
    assert float(aux["kd_loss"]) == pytest.approx(kd.item(), rel=1e-6, abs=1e-9)
    for ours_g, ref_g in zip(grads, (c_t.grad, d_t.grad), strict=True):
        ref_g = np.zeros((B, K)) if ref_g is None else ref_g.numpy()
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-5, atol=1e-8)


def test_deit_loss_none_with_a_dist_head_averages_the_two_heads():
    """Documented departure: without distillation the official code trains only the class
    head; ours trains both heads on the targets, each at half weight."""
    cls, dist, targets = _random_logits(8), _random_logits(9), _soft_targets(10)
    loss, _ = deit_loss(jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(targets))
    ce = SoftTargetCrossEntropy()
    expected = 0.5 * (ce(_t(cls), _t(targets)) + ce(_t(dist), _t(targets))).item()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_distillation_batchmean_equals_kl_div_batchmean(tau: float):
    """`reduction="batchmean"`: torch's `kl_div(..., reduction="batchmean")` times tau**2, the
    summed KL over the batch size (K times the official numel form)."""
    student, teacher = _random_logits(11), _random_logits(12)
    expected = F.kl_div(
        F.log_softmax(_t(student) / tau, dim=1),
        F.log_softmax(_t(teacher) / tau, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (tau * tau)
    ours = soft_distillation(jnp.asarray(student), jnp.asarray(teacher), tau, "batchmean")
    assert float(ours) == pytest.approx(expected.item(), rel=1e-6)
    numel = soft_distillation(jnp.asarray(student), jnp.asarray(teacher), tau, "numel")
    assert float(ours) == pytest.approx(K * float(numel), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# DeiT III's binary cross-entropy (official `--bce-loss`)


def test_binary_cross_entropy_hand_value():
    # Mixed targets binarise to [[1, 1], [1, 0]]: each entry is -ln s(x) or -ln(1 - s(x)).
    # s(0) = 1/2 and s(ln 3) = 3/4: three entries cost ln 2, the (1, ln 3) one ln 4/3.
    targets = jnp.array([[0.3, 0.7], [1.0, 0.0]])
    expected = (3 * math.log(2.0) + math.log(4.0 / 3.0)) / 4
    assert float(binary_cross_entropy(LOGITS, targets)) == pytest.approx(expected, rel=1e-6)
    # the weight of a mixed class does not matter, only that it is there
    other = jnp.array([[0.9, 1e-3], [0.5, 0.0]])
    assert float(binary_cross_entropy(LOGITS, other)) == pytest.approx(expected, rel=1e-6)


def test_binary_cross_entropy_equals_official_bce_on_binarised_targets():
    # official engine.py: targets.gt(0.0) then torch.nn.BCEWithLogitsLoss() (mean over B * K)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 4
    targets = np.where(rng.random((6, 5)) < 0.4, rng.random((6, 5)), 0.0).astype(np.float32)
    t = torch.from_numpy(targets)
    expected = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), t.gt(0.0).type(t.dtype))
    got = binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_deit_loss_bce_replaces_the_label_loss():
    targets = jnp.array([[0.3, 0.7], [1.0, 0.0]])
    loss, aux = deit_loss(LOGITS, None, targets, config=LossConfig(bce=True))
    assert float(loss) == pytest.approx(float(binary_cross_entropy(LOGITS, targets)), rel=1e-6)
    hard = LossConfig(distillation="hard", alpha=0.5, bce=True)
    loss, aux = deit_loss(LOGITS, LOGITS, targets, TEACHER, config=hard)
    assert float(aux["base_loss"]) == pytest.approx(float(binary_cross_entropy(LOGITS, targets)))
