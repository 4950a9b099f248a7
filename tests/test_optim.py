"""Optimiser, schedule, weight-decay mask and EMA against hand-computed values; the schedule
also against timm's `CosineLRScheduler`, per step and as the official DeiT `main.py` runs it."""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.optim import Lamb
from timm.scheduler import CosineLRScheduler, create_scheduler

from deit.optim import (
    EmaConfig,
    OptimConfig,
    create_optimizer,
    ema_decay_at,
    ema_update,
    lr_schedule,
    scaled_lr,
    weight_decay_mask,
)


def _fake_deit_params() -> dict:
    z = jnp.zeros
    return {
        "cls_token": z((1, 1, 8)),
        "dist_token": z((1, 1, 8)),
        "pos_embed": z((1, 6, 8)),
        "patch_embed": {"proj": {"kernel": z((2, 2, 3, 8)), "bias": z((8,))}},
        "blocks_0": {
            "norm1": {"scale": z((8,)), "bias": z((8,))},
            "attn": {"qkv": {"kernel": z((8, 24)), "bias": z((24,))}},
        },
        "norm": {"scale": z((8,)), "bias": z((8,))},
        "cls_head": {"kernel": z((8, 10)), "bias": z((10,))},
        "dist_head": {"kernel": z((8, 10)), "bias": z((10,))},
    }


def test_scaled_lr_follows_the_linear_rule() -> None:
    cfg = OptimConfig()
    assert scaled_lr(cfg, 512) == pytest.approx(5e-4)
    assert scaled_lr(cfg, 1024) == pytest.approx(1e-3)
    assert scaled_lr(cfg, 128) == pytest.approx(1.25e-4)
    assert scaled_lr(OptimConfig(lr=0.01), 768) == 0.01
    with pytest.raises(ValueError, match="global_batch 0"):
        scaled_lr(cfg, 0)


def test_schedule_landmarks() -> None:
    # 10 epochs of 10 steps, warm-up 2 epochs: peak at step 20, last step 99, midpoint 59.5.
    cfg = OptimConfig(epochs=10, warmup_epochs=2, base_lr=5e-4, warmup_lr=1e-6, min_lr=1e-5)
    sched = lr_schedule(cfg, 1024, 10)
    peak = 1e-3
    assert float(sched(0)) == pytest.approx(1e-6)
    assert float(sched(10)) == pytest.approx((1e-6 + peak) / 2)
    assert float(sched(20)) == pytest.approx(peak)
    assert float(sched(99)) == pytest.approx(1e-5)
    assert float(sched(500)) == pytest.approx(1e-5)
    mid = (float(sched(59)) + float(sched(60))) / 2  # symmetric around 59.5
    assert mid == pytest.approx((peak + 1e-5) / 2, rel=1e-4)
    # 4 epochs of 7 steps, warm-up 1 epoch: the cosine spans steps 7..27, its midpoint is 17.
    sched = lr_schedule(OptimConfig(epochs=4, warmup_epochs=1), 512, 7)
    assert float(sched(7)) == pytest.approx(5e-4)
    assert float(sched(17)) == pytest.approx((5e-4 + 1e-5) / 2, rel=1e-6)
    assert float(sched(27)) == pytest.approx(1e-5)


def test_schedule_is_monotone_and_jittable() -> None:
    sched = lr_schedule(OptimConfig(epochs=4, warmup_epochs=1.5), 256, 7)
    values = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(28)))
    warm = 11  # 10.5 warm-up steps round up
    assert np.all(np.diff(values[: warm + 1]) > 0)
    assert np.all(np.diff(values[warm:]) < 0)
    assert values.argmax() == warm


def test_schedule_without_warmup_and_tiny_runs() -> None:
    sched = lr_schedule(OptimConfig(epochs=5, warmup_epochs=0), 512, 3)
    assert float(sched(0)) == pytest.approx(5e-4)
    assert float(sched(14)) == pytest.approx(1e-5)
    for epochs, warmup, steps in [(1, 0, 1), (1, 1, 1), (1, 0, 2), (2, 0.5, 1)]:
        cfg = OptimConfig(epochs=epochs, warmup_epochs=warmup)
        values = [float(lr_schedule(cfg, 64, steps)(s)) for s in range(epochs * steps + 1)]
        peak = scaled_lr(cfg, 64) * (1 + 1e-6)
        assert all(math.isfinite(v) and 0 < v <= peak for v in values)
        assert values[-1] == pytest.approx(1e-5) or warmup == epochs
    with pytest.raises(ValueError, match="steps_per_epoch 0"):
        lr_schedule(OptimConfig(), 512, 0)


def _torch_optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


@pytest.mark.parametrize(
    ("epochs", "warmup_epochs", "steps_per_epoch", "batch"),
    [(10, 2, 10, 1024), (300, 5, 7, 512), (4, 1.5, 7, 256), (5, 0, 3, 512), (2, 0.5, 1, 64)],
)
def test_schedule_equals_timm_cosine_stepped_per_update(
    epochs: int, warmup_epochs: float, steps_per_epoch: int, batch: int
) -> None:
    """Our schedule is timm's `CosineLRScheduler` stepped per update (`t_in_epochs=False`) with
    the warm-up as a prefix (`warmup_prefix=True`, `warmup_t` = our W warm-up steps) and
    `t_initial = T - 1 - W`: timm's cosine spans `t_initial` updates after the prefix and we end
    ours on the last update, T - 1 (`t_initial = T` would stop W + 1 steps short of `min_lr`).
    Ours is float32 against timm's float64: within 4e-6 relative, ~32 float32 ulps."""
    cfg = OptimConfig(epochs=epochs, warmup_epochs=warmup_epochs)
    total = epochs * steps_per_epoch
    warmup = int(warmup_epochs * steps_per_epoch + 0.5)  # half a step rounds up, as documented
    optimizer = _torch_optimizer(scaled_lr(cfg, batch))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total - 1 - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    expected = []
    for step in range(total + 3):  # and a few steps past the end, held at min_lr
        scheduler.step_update(step)
        expected.append(optimizer.param_groups[0]["lr"])
    ours = jax.jit(jax.vmap(lr_schedule(cfg, batch, steps_per_epoch)))(jnp.arange(total + 3))
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected, rtol=4e-6, atol=0)


def test_schedule_against_the_official_per_epoch_schedule() -> None:
    """The official run: `create_scheduler` on DeiT `main.py`'s defaults, stepped with
    `lr_scheduler.step(epoch)` after each epoch, so epoch e trains at the lr of `step(e - 1)`.
    `optim.py` documents how ours departs from it; this checks each stated relationship."""
    args = argparse.Namespace(
        sched="cosine",
        epochs=300,
        lr=5e-4,
        warmup_lr=1e-6,
        min_lr=1e-5,
        warmup_epochs=5,
        cooldown_epochs=10,
        decay_epochs=30,
        decay_rate=0.1,
        patience_epochs=10,
        lr_noise=None,
        lr_noise_pct=0.67,
        lr_noise_std=1.0,
    )
    optimizer = _torch_optimizer(args.lr)
    scheduler, _ = create_scheduler(args, optimizer)
    official = []
    for epoch in range(args.epochs):
        official.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)
    official = np.asarray(official)

    cfg, spe, peak = OptimConfig(), 10, 5e-4  # the same defaults; batch 512 gives lr 5e-4
    ours = np.asarray(jax.jit(jax.vmap(lr_schedule(cfg, 512, spe)))(jnp.arange(300 * spe)))
    ours = ours.astype(np.float64).reshape(300, spe)  # [epoch, step in epoch]
    # Epochs 0 and 1 both run at warmup_lr; then the official lr lags ours by one epoch through
    # the warm-up: its epoch e + 1 runs at our lr of epoch e's first step.
    assert official[0] == official[1] == args.warmup_lr
    np.testing.assert_allclose(official[1:6], ours[:5, 0], rtol=4e-6)
    # Ours peaks exactly at the end of the warm-up; the official cosine starts at epoch 0
    # (warmup_prefix=False), so its best, at epoch 6, is already below the peak.
    assert ours[5, 0] == pytest.approx(peak, rel=1e-6) and ours.max() == ours[5, 0]
    assert official.argmax() == 6 and official.max() < peak * (1 - 1e-5)
    # Ours reaches min_lr on the last step, the official run never does.
    assert ours[-1, -1] == pytest.approx(args.min_lr, rel=1e-5)
    assert official[-1] > args.min_lr * (1 + 1e-3)
    # In between both are the same cosine shifted by at most W + 1 epochs of E, and a cosine
    # from peak to min_lr moves at most pi / 2 * (peak - min_lr) per unit of its argument.
    gap = np.abs(ours[6:] - official[6:, None]).max()
    assert 0 < gap <= math.pi / 2 * (peak - args.min_lr) * (5 + 1) / 300


def test_weight_decay_mask_on_a_deit_tree() -> None:
    mask = weight_decay_mask(_fake_deit_params())
    decayed = {
        "/".join(str(k.key) for k in path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(mask)
        if leaf
    }
    assert decayed == {
        "patch_embed/proj/kernel",
        "blocks_0/attn/qkv/kernel",
        "cls_head/kernel",
        "dist_head/kernel",
    }
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(_fake_deit_params())


def _tiny_params() -> dict:
    kernel = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    return {"dense": {"kernel": kernel, "bias": jnp.array([1.0, 2.0])}}


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_one_step_decays_kernels_not_biases(opt: str) -> None:
    cfg = OptimConfig(opt=opt, lr=0.1, weight_decay=0.05, warmup_epochs=0, epochs=1)
    tx, sched = create_optimizer(cfg, 8, 10)
    params = _tiny_params()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    lr = float(sched(0))
    assert lr == pytest.approx(0.1)
    kernel = params["dense"]["kernel"]
    np.testing.assert_allclose(new["dense"]["kernel"], kernel - lr * 0.05 * kernel, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])


def test_clipping_bounds_the_update() -> None:
    # SGD without decay or momentum: the update is -lr * clipped gradient.
    cfg = OptimConfig(
        opt="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_epochs=0, clip_grad_norm=1.0
    )
    tx, _ = create_optimizer(cfg, 8, 10)
    params = _tiny_params()
    grads = {"dense": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], -3.0 / math.sqrt(6 * 9.0), rtol=1e-5)


def test_ema_arithmetic() -> None:
    ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    params = {"w": jnp.array([3.0, 6.0]), "b": jnp.array(0.0)}
    out = jax.jit(ema_update)(ema, params, 0.75)
    np.testing.assert_allclose(out["w"], [1.5, 3.0])
    np.testing.assert_allclose(out["b"], 3.0)
    warm = EmaConfig(decay=0.99996, warmup=True)
    assert float(ema_decay_at(0, warm)) == pytest.approx(0.1)
    assert float(ema_decay_at(90, warm)) == pytest.approx(0.91)
    assert float(ema_decay_at(10**7, warm)) == pytest.approx(0.99996)
    # The default is the official constant decay, from the first update on.
    assert float(ema_decay_at(0, EmaConfig())) == pytest.approx(0.99996)
    assert float(ema_decay_at(10**7, EmaConfig())) == pytest.approx(0.99996)
    with pytest.raises(ValueError, match=r"decay 1\.0"):
        EmaConfig(decay=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr -0.001"),
        ({"base_lr": 0.0}, "base_lr 0.0"),
        ({"opt": "lars"}, "opt 'lars'"),
        ({"weight_decay": -0.1}, "weight_decay -0.1"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps 0.0"),
        ({"warmup_epochs": -1}, "warmup_epochs -1"),
        ({"epochs": 0}, "epochs 0"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm 0.0"),
        ({"min_lr": -1e-5}, "min_lr"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)


def test_lamb_equals_timm_lamb_with_its_parameter_groups() -> None:
    # What `--opt fusedlamb` builds without apex: timm's Lamb, a decayed group of kernels and a
    # group of 1-D parameters at weight decay 0, which it does not adapt (always_adapt False).
    cfg = OptimConfig(
        opt="lamb", lr=0.01, weight_decay=0.05, warmup_epochs=0, epochs=1, min_lr=0.01
    )
    tx, _ = create_optimizer(cfg, 8, 10)
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "norm": {"bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
    }
    kernel = torch.nn.Parameter(torch.tensor(np.asarray(params["dense"]["kernel"])))
    bias = torch.nn.Parameter(torch.tensor(np.asarray(params["norm"]["bias"])))
    groups = [{"params": [kernel], "weight_decay": 0.05}, {"params": [bias], "weight_decay": 0.0}]
    ref = Lamb(groups, lr=0.01, eps=1e-8, betas=(0.9, 0.999), max_grad_norm=None)
    state = tx.init(params)
    for _ in range(3):
        grads = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
        )
        kernel.grad = torch.tensor(np.asarray(grads["dense"]["kernel"]))
        bias.grad = torch.tensor(np.asarray(grads["norm"]["bias"]))
        ref.step()
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["dense"]["kernel"], kernel.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["norm"]["bias"], bias.detach().numpy(), rtol=1e-5)


def test_lamb_on_decayed_leaves_is_optax_lamb() -> None:
    cfg = OptimConfig(
        opt="lamb", lr=0.01, weight_decay=0.05, warmup_epochs=0, epochs=1, min_lr=0.01
    )
    tx, _ = create_optimizer(cfg, 8, 10)
    ref = optax.lamb(0.01, eps=1e-8, weight_decay=0.05)
    params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 4.0]])}}
    grads = {"dense": {"kernel": jnp.array([[0.5, 0.1], [-0.3, 0.2]])}}
    ours, _ = tx.update(grads, tx.init(params), params)
    theirs, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(ours["dense"]["kernel"], theirs["dense"]["kernel"], rtol=1e-6)
