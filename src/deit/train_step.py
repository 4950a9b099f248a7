"""The train state and the pure jitted step: what one training step computes, and the weights
the loop evaluates each epoch.

One step (DeiT §5-6): normalise -> random erasing -> mixup/cutmix with label smoothing -> student
(train mode) and teacher (eval mode, the same mixed images through its own normalisation, under
`stop_gradient`) -> `deit_loss` -> AdamW -> EMA. Randomness is `fold_in(key, step)`, so the step is
a function of `(state, batch)` alone and a resumed run repeats an uninterrupted one.
The same step trains the CNN teacher (a model with BatchNorm statistics and no distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from deit import data as data_lib
from deit import evaluate as eval_lib
from deit.data.device import ErasingConfig, MixupConfig, mixup_cutmix, normalize, random_erasing
from deit.losses import LossConfig, deit_loss
from deit.model import forward
from deit.optim import EmaConfig, ema_decay_at, ema_update
from deit.teacher import Teacher, teacher_logits


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # BatchNorm statistics ({} for DeiT)
    ema_params: Any  # None without EMA
    rng: jax.Array


@dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides the state and the batch (static under jit)."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mixup: MixupConfig
    erasing: ErasingConfig
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(enabled=False))


def init_state(
    model: Any,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    seed: int,
    image_shape: tuple[int, ...],
    params: Any = None,
) -> TrainState:
    """A fresh state; `params` (e.g. a checkpoint adapted for fine-tuning) replace the init;
    `{"params", "batch_stats"}` (a CNN's variables) replace both."""
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    if params is None:
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32)))(
            init_key
        )
    elif set(params) == {"params", "batch_stats"}:  # a CNN's variables (a teacher fine-tuned)
        variables = jax.tree_util.tree_map(jnp.array, dict(params))
    else:
        # Copies: the jitted step donates the state, which must not invalidate the caller's arrays.
        variables = {"params": jax.tree_util.tree_map(jnp.array, params)}
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if cfg.ema.enabled else None,
        rng=state_key,
    )


def make_train_step(
    model: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch, teacher=None) -> (state, metrics)`; batch images uint8."""
    mean, std = jnp.asarray(cfg.mean), jnp.asarray(cfg.std)

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], teacher: Teacher | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        erase_key, mix_key, drop_key = jax.random.split(rng, 3)
        # Official order: erasing is a per-image transform, mixup a batch one; the teacher then
        # sees exactly the student's input.
        x = normalize(batch["image"], cfg.mean, cfg.std)
        x = random_erasing(erase_key, x, cfg.erasing)
        x, targets = mixup_cutmix(mix_key, x, batch["label"], cfg.num_classes, cfg.mixup)
        t_logits = None
        if teacher is not None and cfg.loss.distillation != "none":
            t_logits = teacher_logits(teacher, x * std + mean)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
            cls, dist, stats = forward(
                model, params, state.batch_stats, x, train=True, rng=drop_key
            )
            loss, aux = deit_loss(cls, dist, targets, t_logits, config=cfg.loss)
            return loss, (aux, stats)

        (loss, (aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, ema_decay_at(state.step, cfg.ema))
        metrics = {
            "loss": loss,
            "base_loss": aux["base_loss"],
            "kd_loss": aux["kd_loss"],
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            batch_stats=stats,
            ema_params=ema,
        )
        return new_state, metrics

    return train_step


def with_finite_flag(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
) -> Callable[..., tuple[TrainState, dict[str, jax.Array], jax.Array]]:
    """`step(state, batch, teacher, first_bad) -> (state, metrics, first_bad)`: `first_bad`, an
    int32 scalar kept on the device (-1 while all is well), becomes the first step whose loss
    or new parameters are not finite, and stays so. The loop reads it only where it waits for
    the device anyway (a log step, before a save or an export), so the check costs no host
    sync per step, and yet names the step where it went wrong, not the step it was seen at."""

    def step(
        state: TrainState, batch: dict[str, jax.Array], teacher: Teacher | None, first_bad: Any
    ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
        new, metrics = step_fn(state, batch, teacher)
        leaves = jax.tree_util.tree_leaves(new.params)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.stack([jnp.isfinite(x).all() for x in leaves])
        )
        first_bad = jnp.where((first_bad < 0) & ~finite, new.step, first_bad)
        return new, metrics, first_bad

    return step


def weight_sets(state: TrainState) -> dict[str, Any]:
    """The weights evaluated each epoch: `val` (the trained ones) and `val_ema` (with EMA)."""
    weights = {"val": state.params}
    if state.ema_params is not None:
        weights["val_ema"] = state.ema_params
    return weights


def evaluate_state(
    eval_step: Callable[[Any, Any, dict[str, jax.Array]], dict],
    state: TrainState,
    source: data_lib.RecordSource,
    data_cfg: data_lib.DataConfig,
    mesh: Any,
    global_batch: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """`{"val": per-head metrics of the weights, "val_ema": the same for the EMA weights}`."""
    sums = eval_lib.SetSums(eval_step, weight_sets(state), state.batch_stats)
    return eval_lib.run_eval_sets(sums, source, data_cfg, mesh, global_batch)
