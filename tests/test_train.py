import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deit
from deit import configs, data, export, recipes, train
from deit.augment import ErasingConfig, MixupConfig
from deit.checkpoint import Checkpoints, abstract_like
from deit.losses import LossConfig
from deit.optim import EmaConfig, OptimConfig, create_optimizer
from deit.teacher import Teacher, create_teacher


def tiny_config(tmp_path, **kw) -> configs.TrainConfig:
    base = recipes.digits()
    return dataclasses.replace(
        base,
        model=configs.ModelConfig(name="deit_test_distilled_patch4_32"),
        batch_size=64,
        output=str(tmp_path / "run"),
        data=dataclasses.replace(base.data, img_size=16),
        optim=OptimConfig(lr=2e-3, warmup_epochs=0, epochs=2),
        ema=EmaConfig(decay=0.99),
        log_every=1,
        checkpoint_every=10_000,
        **kw,
    )


def _random_batch(seed: int) -> dict[str, jax.Array]:
    """Eight random 16x16 uint8 images of the 10 digit classes."""
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, 8, dtype=np.int32)),
    }


@pytest.fixture(scope="module")
def sources():
    train_src, val_src = data.digits()
    return train_src, val_src


@pytest.fixture(scope="module")
def frozen_teacher():
    model = create_teacher("resnet8", 10)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3))))(jax.random.PRNGKey(5))
    return Teacher.from_resnet(model, variables, data.IMAGENET_MEAN, data.IMAGENET_STD, 16)


@pytest.mark.slow
def test_two_epochs_distilled_end_to_end(tmp_path, sources, frozen_teacher):
    cfg = tiny_config(tmp_path, loss=LossConfig(distillation="hard"))
    train_src, val_src = sources
    model = deit.create_model(cfg.model.name, img_size=16, drop_path_rate=0.1)
    before = jax.tree_util.tree_map(np.array, frozen_teacher.variables)
    results = train.fit(model, cfg, train_src, val_src, teacher=frozen_teacher)
    out = tmp_path / "run"

    # The loss falls: mean of the last five logged steps below the first five.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 2 * (len(train_src) // 64)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(x["kd_loss"] > 0 for x in lines if x["kind"] == "train")
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [x["epoch"] for x in evals] == [0, 1]
    assert set(results["val"]) == {"cls", "dist", "avg"} and "val_ema" in results
    assert results["val"]["avg"]["count"] == len(val_src)

    # The teacher is frozen: its variables are exactly what they were.
    after = jax.tree_util.tree_map(np.array, frozen_teacher.variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)

    # The last checkpoint restores to exactly the final state (exported in final/).
    tx, _ = create_optimizer(cfg.optim, 64, len(train_src) // 64)
    step_cfg = train.StepConfig(
        10, cfg.data.mean, cfg.data.std, cfg.mixup, cfg.erasing, ema=cfg.ema
    )
    fresh = train.init_state(model, tx, step_cfg, seed=123, image_shape=(16, 16, 3))
    ckpts = Checkpoints(out / "checkpoints")
    restored, meta = ckpts.restore(abstract_like(fresh))
    ckpts.close()
    assert int(restored.step) == results["steps"] == 2 * (len(train_src) // 64)
    assert meta["epoch"] == 1
    _, variables, config = export.load_model(out / "final")
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"], restored.params)
    assert config["classes"] == train_src.classes and config["img_size"] == 16

    # A second fit into the same folder without resume refuses to overwrite it.
    with pytest.raises(ValueError, match="already holds a run"):
        train.fit(model, cfg, train_src, val_src, teacher=frozen_teacher)


def test_train_step_is_deterministic_and_teacher_gets_no_gradient(frozen_teacher):
    model = deit.create_model("deit_test_distilled_patch4_32", img_size=16)
    tx, schedule = create_optimizer(OptimConfig(lr=1e-3, warmup_epochs=0, epochs=1), 8, 10)
    cfg = train.StepConfig(
        10,
        data.IMAGENET_MEAN,
        data.IMAGENET_STD,
        MixupConfig(),
        ErasingConfig(),
        LossConfig("soft"),
        EmaConfig(decay=0.9),
    )
    state = train.init_state(model, tx, cfg, 0, (16, 16, 3))
    step = jax.jit(train.make_train_step(model, tx, schedule, cfg))
    batch = _random_batch(0)
    a, ma = step(state, batch, frozen_teacher)
    b, mb = step(state, batch, frozen_teacher)
    assert float(ma["loss"]) == float(mb["loss"]) and float(ma["kd_loss"]) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    assert int(a.step) == 1
    # The next step draws other augmentation: same batch, different loss.
    _, mc = step(a, batch, frozen_teacher)
    assert float(mc["loss"]) != float(ma["loss"])
    # EMA moved towards the new parameters, not onto them.
    leaf = lambda t: jax.tree_util.tree_leaves(t)[0]
    assert not np.allclose(leaf(a.ema_params), leaf(a.params))


def test_teacher_class_count_mismatch_is_an_error(tmp_path, frozen_teacher):
    from deit.teacher import check_teacher

    with pytest.raises(ValueError, match="teacher predicts 10 classes but the student has 7"):
        check_teacher(frozen_teacher, 7)


def test_bfloat16_training_keeps_float32_state_and_learns():
    """Mixed precision: bf16 compute, float32 parameters, optimizer state and loss."""
    model = deit.create_model("deit_test_distilled_patch4_32", img_size=16, dtype="bfloat16")
    tx, schedule = create_optimizer(OptimConfig(lr=2e-3, warmup_epochs=0, epochs=1), 32, 40)
    off = MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0, label_smoothing=0.0)
    cfg = train.StepConfig(10, data.IMAGENET_MEAN, data.IMAGENET_STD, off, ErasingConfig(prob=0.0))
    state = train.init_state(model, tx, cfg, 0, (16, 16, 3))
    step = jax.jit(train.make_train_step(model, tx, schedule, cfg))
    train_src, _ = data.digits()
    batch = next(
        data.train_batches(
            train_src,
            dataclasses.replace(recipes.digits().data, img_size=16),
            seed=0,
            global_batch=32,
        )
    )
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # 2.2 -> 1.64 measured


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_n_steps_is_the_closed_form(warmup):
    """The EMA `train_step` keeps is `d^n w_0 + sum_k (1 - d_k) prod_{j>k} d_j w_{k+1}`: with a
    constant `d` (the official `ModelEma`) the initial weights keep `d^n` of the weight."""
    model = deit.create_model("deit_test_distilled_patch4_32", img_size=16)
    tx, schedule = create_optimizer(OptimConfig(lr=1e-2, warmup_epochs=0, epochs=1), 8, 6)
    ema = EmaConfig(decay=0.8, warmup=warmup)
    off = MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0)
    cfg = train.StepConfig(
        10, data.IMAGENET_MEAN, data.IMAGENET_STD, off, ErasingConfig(0.0), ema=ema
    )
    state = train.init_state(model, tx, cfg, 0, (16, 16, 3))
    step = jax.jit(train.make_train_step(model, tx, schedule, cfg))
    batch = _random_batch(1)
    leaf = lambda tree: np.asarray(tree["cls_head"]["kernel"], np.float64)
    weights = [leaf(state.params)]
    for _ in range(6):
        state, _ = step(state, batch)
        weights.append(leaf(state.params))
    decays = [min(0.8, (1 + t) / (10 + t)) if warmup else 0.8 for t in range(6)]
    expected = weights[0] * np.prod(decays)
    for k, d in enumerate(decays):
        expected += (1 - d) * np.prod(decays[k + 1 :]) * weights[k + 1]
    np.testing.assert_allclose(leaf(state.ema_params), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(leaf(state.ema_params), weights[-1], atol=1e-4)
