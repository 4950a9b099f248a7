"""Optimiser, learning-rate schedule, weight-decay mask and weight EMA of the DeiT recipe.

Defaults are the official `main.py` ones (DeiT §6, Table 9): AdamW with betas (0.9, 0.999),
eps 1e-8, weight decay 0.05; lr 5e-4 × global batch / 512; 5 warm-up epochs from 1e-6, then
cosine to 1e-5 over 300 epochs; EMA of the weights with the constant decay 0.99996 (timm's
`ModelEma` as `main.py` uses it). SGD (momentum 0.9) is the maintainers' recipe for transfer to
small data sets. LAMB (You et al., 2020) is DeiT III's optimiser (official `--opt fusedlamb`).

The schedule is per optimiser step. The reference (timm's `CosineLRScheduler`, stepped once per
epoch with `lr_scheduler.step(epoch)` *after* the epoch) holds the lr constant inside an epoch
and lags one epoch: epochs 0 and 1 both run at the warm-up lr and the peak is reached at epoch
6, not 5. Here the warm-up ends exactly at `warmup_epochs`, and the cosine runs from the peak
at the end of warm-up to `min_lr` on the last step (timm's `warmup_prefix=False`, which DeiT
uses, starts the cosine at epoch 0 so it never quite reaches the peak or `min_lr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from deit.errors import InputError

REFERENCE_BATCH = 512  # the lr is quoted for this global batch (official `linear_scaled_lr`)
# timm's `no_weight_decay()` for DeiT; the official code decays `dist_token`, timm does not.
NO_WEIGHT_DECAY = ("cls_token", "dist_token", "pos_embed")
OPTIMIZERS = ("adamw", "sgd", "lamb")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and lr schedule of one trained network (official `main.py` defaults)."""

    opt: Literal["adamw", "sgd", "lamb"] = "adamw"
    """Optimiser: AdamW (the paper), SGD with momentum (transfer to small data sets) or LAMB
    (DeiT III; official `--opt fusedlamb`, which also clips the gradient norm at 1.0: set
    `clip_grad_norm` 1.0 as the deit3 recipe does)."""
    lr: float | None = None
    """Absolute peak lr; None: `base_lr * global batch / 512`."""
    base_lr: float = 5e-4
    """Peak lr quoted for a global batch of 512 (official `--lr`), scaled linearly."""
    weight_decay: float = 0.05
    """Decoupled weight decay (AdamW) or L2 added to the gradient (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW / LAMB betas."""
    eps: float = 1e-8
    """AdamW / LAMB epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value; None: no clipping."""
    epochs: int = 300
    """Epochs of this network's training: the schedule's length."""
    warmup_epochs: float = 5.0
    """Linear warm-up from `warmup_lr` to the peak (a warm-up longer than the run is cut)."""
    warmup_lr: float = 1e-6
    """lr at the first step."""
    min_lr: float = 1e-5
    """lr at the last step, the end of the cosine."""

    def __post_init__(self) -> None:
        if self.opt not in OPTIMIZERS:
            raise InputError(f"opt {self.opt!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"lr {self.lr}; expected a positive learning rate or None")
        if not self.base_lr > 0:
            raise InputError(f"base_lr {self.base_lr}; expected a positive learning rate")
        for name in ("weight_decay", "warmup_lr", "min_lr", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} {getattr(self, name)}; expected a value >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"betas {self.betas}; expected two values in [0, 1)")
        if not self.eps > 0:
            raise InputError(f"eps {self.eps}; expected a value > 0")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum {self.momentum}; expected a value in [0, 1)")
        if not (isinstance(self.epochs, int) and self.epochs > 0):
            raise InputError(f"epochs {self.epochs}; expected a positive integer")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise InputError(f"clip_grad_norm {self.clip_grad_norm}; expected a norm > 0 or None")


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights, evaluated beside them each epoch.

    The official code (timm's `ModelEma`) updates it after every optimiser step with a constant
    decay, from the initial weights: after `n` steps the EMA is `d^n w_0 + (1 - d) sum_k d^(n-1-k)
    w_k`. `warmup` opts into TensorFlow's rule `min(d, (1 + t) / (10 + t))` instead.
    """

    enabled: bool = True
    """Keep an EMA of the weights (official `--model-ema`, on by default)."""
    decay: float = 0.99996
    """Per-step decay (official `--model-ema-decay`); the window is about 1 / (1 - decay) steps."""
    warmup: bool = False
    """Use `min(decay, (1 + step) / (10 + step))` (not the official rule; for short runs)."""

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise InputError(f"decay {self.decay}; expected a value in [0, 1)")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} {value!r}; expected a positive integer")


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr: `cfg.lr` when set, else the official linear scaling `base_lr * batch / 512`."""
    _check_positive_int("global_batch", global_batch)
    if cfg.lr is not None:
        return float(cfg.lr)
    return cfg.base_lr * global_batch / REFERENCE_BATCH


def lr_schedule(cfg: OptimConfig, global_batch: int, steps_per_epoch: int) -> optax.Schedule:
    """Per-step lr: linear warm-up from `warmup_lr`, then cosine from the peak to `min_lr`.

    Step `s` (the optimiser's update count, from 0) gets `warmup_lr` at `s = 0`, the peak at
    `s = W` (`warmup_epochs * steps_per_epoch` rounded to the nearest step) and `min_lr` at the
    last update `s = T - 1`, `T = epochs * steps_per_epoch`; it stays at `min_lr` afterwards.
    With `warmup_epochs = 0` step 0 is at the peak; a warm-up that leaves a single step runs
    that step at the peak. Jittable: `count` may be traced.
    """
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    peak = scaled_lr(cfg, global_batch)
    start, end = cfg.warmup_lr, cfg.min_lr
    total = cfg.epochs * steps_per_epoch
    # Half a step rounds up (Python's round() would send 0.5 warm-up steps to 0).
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch + 0.5), total)
    # At least one cosine step so the tiniest runs do not divide by zero.
    cosine = max(total - 1 - warmup, 1)

    def schedule(count: jax.Array | int) -> jax.Array:
        # Written out rather than optax's warmup_cosine_decay_schedule, whose `end + (init - end)
        # * (1 - t)` form misses `warmup_lr` by float32 cancellation at step 0.
        s = jnp.asarray(count, jnp.float32)
        warm = start + (peak - start) * (s / max(warmup, 1))
        t = jnp.clip((s - warmup) / cosine, 0.0, 1.0)
        cos = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(s < warmup, warm, cos).astype(jnp.float32)

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies.

    Only Dense/Conv kernels (a leaf named `kernel` with ndim >= 2) are decayed; biases, norm
    scales and biases, and `cls_token` / `dist_token` / `pos_embed` are not (timm's
    `no_weight_decay()` plus its rule of leaving every 1-D parameter alone).
    """

    def decay(path: tuple[Any, ...], leaf: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if any(n in NO_WEIGHT_DECAY for n in names):
            return False
        return bool(names) and names[-1] == "kernel" and len(getattr(leaf, "shape", ())) >= 2

    return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(
    cfg: OptimConfig, global_batch: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation of the recipe and its lr schedule (for logging).

    Order: optional global-norm clipping of the raw gradients (timm's `--clip-grad`), then AdamW
    with decoupled decay `p -= lr * wd * p` on masked leaves (torch's `AdamW`); for SGD, decay
    is added to the gradient before momentum, as torch's `SGD(weight_decay=...)` does.

    LAMB is `optax.lamb`'s chain (Adam moments with bias correction, decoupled decay added to the
    Adam step, the layer-wise trust ratio `||w|| / ||step||`, the lr) with the decay mask also
    masking the trust ratio: apex's `FusedLAMB` and timm's `Lamb` (what `--opt fusedlamb` builds)
    adapt only the parameter groups with weight decay (`use_nvlamb` / `always_adapt` False), so
    biases, norms and tokens take the plain Adam step.
    """
    schedule = lr_schedule(cfg, global_batch, steps_per_epoch)
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.opt == "adamw":
        b1, b2 = cfg.betas
        parts.append(
            optax.adamw(
                schedule,
                b1=b1,
                b2=b2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                mask=weight_decay_mask,
            )
        )
    elif cfg.opt == "lamb":
        b1, b2 = cfg.betas
        parts += [
            optax.scale_by_adam(b1=b1, b2=b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask),
            optax.scale_by_learning_rate(schedule),
        ]
    else:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=False))
    return optax.chain(*parts), schedule


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """`decay * ema + (1 - decay) * params`, leaf by leaf; pure and jittable."""
    decay = jnp.asarray(decay, jnp.float32)

    def mix(e: jax.Array, p: jax.Array) -> jax.Array:
        return (decay * e + (1 - decay) * p).astype(e.dtype)

    return jax.tree_util.tree_map(mix, ema_params, params)


def ema_decay_at(step: int | jax.Array, cfg: EmaConfig) -> jax.Array:
    """The decay of update `step` (from 0): `cfg.decay`, or with `cfg.warmup` TensorFlow's
    `ExponentialMovingAverage(num_updates=...)` rule `min(decay, (1 + step) / (10 + step))`, which
    reaches 0.99996 only after ~225k updates (the reference run has 375k)."""
    decay = jnp.float32(cfg.decay)
    if not cfg.warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1 + step) / (10 + step))
