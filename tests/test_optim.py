"""Optimiser, schedule, weight-decay mask and EMA against hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deit.optim import (
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
    assert float(ema_decay_at(0, 0.99996)) == pytest.approx(0.1)
    assert float(ema_decay_at(90, 0.99996)) == pytest.approx(0.91)
    assert float(ema_decay_at(10**7, 0.99996)) == pytest.approx(0.99996)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr -0.001"),
        ({"base_lr": 0.0}, "base_lr 0.0"),
        ({"opt": "lamb"}, "opt 'lamb'"),
        ({"weight_decay": -0.1}, "weight_decay -0.1"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps 0.0"),
        ({"warmup_epochs": -1}, "warmup_epochs -1"),
        ({"warmup_epochs": 10, "epochs": 5}, "warmup_epochs 10"),
        ({"epochs": 0}, "epochs 0"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm 0.0"),
        ({"ema_decay": 1.0}, "ema_decay 1.0"),
        ({"min_lr": -1e-5}, "min_lr"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)
