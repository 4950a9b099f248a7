"""Training losses of DeiT (Touvron et al., 2021, §5): cross-entropy and distillation; and DeiT
III's binary cross-entropy (Touvron et al., 2022, §3: official `--bce-loss`).

The objective is the official `losses.py` one, `(1 - alpha) * base + alpha * kd`: `base` is the
cross-entropy of the class head against the (mixed, label-smoothed) targets and `kd` compares the
distillation head with a frozen teacher, either softly (KL divergence at temperature `tau`, §5.1
"soft distillation") or against the teacher's argmax (§5.1 "hard-label distillation"). All
functions are pure and jittable; the configuration arguments are static Python values and
everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from deit.errors import InputError

DISTILLATION_KINDS = ("none", "soft", "hard")
SOFT_REDUCTIONS = ("numel", "batchmean")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise InputError(f"tau {tau}; expected a positive temperature")


def _check_reduction(reduction: str) -> None:
    if reduction not in SOFT_REDUCTIONS:
        raise InputError(f"soft reduction {reduction!r}; expected 'numel' or 'batchmean'")


@dataclass(frozen=True)
class LossConfig:
    """The static settings of `deit_loss` (official `main.py` defaults: none, 0.5, 1.0)."""

    distillation: Literal["none", "soft", "hard"] = "none"
    """What the distillation head learns from: nothing (labels only), the teacher's softened
    distribution (KL at `tau`) or the teacher's argmax."""
    alpha: float = 0.5
    """Weight of the distillation term: `(1 - alpha) * label loss + alpha * distillation loss`."""
    tau: float = 1.0
    """Temperature of soft distillation."""
    soft_reduction: Literal["numel", "batchmean"] = "numel"
    """Soft KL divided by the number of logits (the official code) or by the batch size."""
    bce: bool = False
    """The label loss is binary cross-entropy on the (mixed) targets binarised at > 0 (DeiT III,
    official `--bce-loss`), instead of the soft-target cross-entropy; use it without label
    smoothing, which would make every binarised target 1."""

    def __post_init__(self) -> None:
        if self.distillation not in DISTILLATION_KINDS:
            raise InputError(
                f"distillation {self.distillation!r}; expected one of "
                f"{', '.join(DISTILLATION_KINDS)}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha {self.alpha} is outside [0, 1]")
        _check_tau(self.tau)
        _check_reduction(self.soft_reduction)


def _log_softmax(logits: jax.Array) -> jax.Array:
    # bfloat16 log-probabilities lose ~3 digits; the loss is cheap next to the model.
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of `-sum_k targets * log_softmax(logits)`; `(B, K), (B, K) -> ()`.

    timm's `SoftTargetCrossEntropy`, the official base criterion when mixup or cutmix is on.
    """
    return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * _log_softmax(logits), axis=-1))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Label-smoothed cross-entropy; `logits (B, K)`, integer `labels (B,)` -> `()`.

    timm's `LabelSmoothingCrossEntropy`: `(1 - eps) * nll + eps * mean_k(-log p_k)`, averaged over
    the batch. With `eps = 0` this is the plain cross-entropy.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(f"label_smoothing {label_smoothing} is outside [0, 1)")
    logp = _log_softmax(logits)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    uniform = -jnp.mean(logp, axis=-1)
    return jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * uniform)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """DeiT III's label loss; `(B, K), (B, K) -> ()`: each class an independent sigmoid, the target
    1 where the mixed target is above 0, else 0 (official `engine.py`: `targets.gt(0.0)` before
    `torch.nn.BCEWithLogitsLoss()`), averaged over all `B * K` entries.

    After mixup or cutmix both mixed classes are positives, whatever their weights. Per entry
    `softplus(x) - y x`, the numerically stable form of `-y log s(x) - (1 - y) log(1 - s(x))`.
    """
    x = logits.astype(jnp.float32)
    y = (targets > 0).astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(x) - y * x)


def soft_distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tau: float,
    reduction: str = "numel",
) -> jax.Array:
    """`tau**2 * KL(teacher || student)` of the temperature-`tau` softmaxes; `(B, K) x 2 -> ()`.

    `reduction="numel"` (the default) divides the summed KL by `B * K`, as the official DeiT
    `losses.py` does (`reduction='sum'` then `/ outputs_kd.numel()`): it is what the paper's
    soft-distillation numbers were trained with, so the default reproduces them. `"batchmean"`
    divides by `B` only (timm's token distillation): it is `K` times larger and is the textbook
    KD loss of Hinton et al. (2015), so `alpha` and `tau` then mean what they mean in the KD
    literature. Gradients flow into both arguments; `deit_loss` stops the teacher's.
    """
    _check_tau(tau)
    _check_reduction(reduction)
    log_s = _log_softmax(student_logits / tau)
    log_t = _log_softmax(teacher_logits / tau)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s))
    count = student_logits.size if reduction == "numel" else student_logits.shape[0]
    return kl * (tau**2) / count


def hard_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Cross-entropy of the student against the teacher's argmax, no smoothing; `-> ()`.

    Official DeiT hard-label distillation: `cross_entropy(outputs_kd, teacher.argmax(dim=1))`.
    """
    return cross_entropy(student_logits, jnp.argmax(teacher_logits, axis=-1))


def deit_loss(
    cls_logits: jax.Array,
    dist_logits: jax.Array | None,
    targets: jax.Array,
    teacher_logits: jax.Array | None = None,
    *,
    distillation: str = "none",
    alpha: float = 0.5,
    tau: float = 1.0,
    soft_reduction: str = "numel",
    config: LossConfig | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DeiT objective: `(loss, {"loss", "base_loss", "kd_loss"})`, all float32 scalars.

    `cls_logits`, `dist_logits`, `teacher_logits` are `(B, K)`; `targets` are `(B, K)` soft
    targets (mixup/cutmix output with label smoothing folded in). The settings come either from
    the keyword arguments or from `config`, not both.

    `base` is `soft_target_cross_entropy`, or `binary_cross_entropy` with `bce` (DeiT III).

    - `"none"`: `base = soft_target_cross_entropy(cls_logits, targets)`. If the model has a
      distillation head, *both* heads are trained on the targets and `base` is their mean. This
      deliberately departs from the official code, which leaves that head untrained while its
      evaluation still averages the two heads' logits.
    - `"soft"` / `"hard"`: `(1 - alpha) * base + alpha * kd`, `base` on the class head only and
      `kd` (`soft_distillation` / `hard_distillation`) on the distillation head, as officially.
      A model without a distillation head (`dist_logits=None`) is distilled through its class
      token, which then carries both terms. `teacher_logits` (required) are treated as
      constants (`stop_gradient`), like the official teacher run under `no_grad`.
    """
    defaults = (distillation, alpha, tau, soft_reduction) == ("none", 0.5, 1.0, "numel")
    if config is None:
        config = LossConfig(distillation, alpha, tau, soft_reduction)
    elif not defaults:
        raise InputError("deit_loss got both config and loss settings; expected one of them")
    if targets.shape != cls_logits.shape:
        raise InputError(
            f"targets shape {targets.shape}; expected soft targets shaped like the logits "
            f"{cls_logits.shape}"
        )

    label_loss = binary_cross_entropy if config.bce else soft_target_cross_entropy
    if config.distillation == "none":
        base = label_loss(cls_logits, targets)
        if dist_logits is not None:
            base = 0.5 * (base + label_loss(dist_logits, targets))
        zero = jnp.zeros((), jnp.float32)
        return base, {"loss": base, "base_loss": base, "kd_loss": zero}

    if teacher_logits is None:
        raise InputError(
            f"distillation {config.distillation!r} needs teacher_logits; expected an array"
        )
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    student = cls_logits if dist_logits is None else dist_logits
    base = label_loss(cls_logits, targets)
    if config.distillation == "soft":
        kd = soft_distillation(student, teacher_logits, config.tau, config.soft_reduction)
    else:
        kd = hard_distillation(student, teacher_logits)
    loss = (1.0 - config.alpha) * base + config.alpha * kd
    return loss, {"loss": loss, "base_loss": base, "kd_loss": kd}
