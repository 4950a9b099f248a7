"""CNN teachers and the frozen Teacher wrapper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit.teacher import (
    TEACHERS,
    ResNet,
    Teacher,
    check_teacher,
    create_teacher,
    teacher_logits,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _images(seed: int = 0, b: int = 2, size: int = 32) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, 3))


def _init(model: ResNet, size: int = 32) -> dict:
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))


@pytest.fixture(scope="module")
def resnet8() -> tuple[ResNet, dict]:
    model = create_teacher("resnet8", num_classes=10)
    return model, _init(model)


@pytest.mark.parametrize("small_input", [True, False])
@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_every_registered_resnet_gives_logits_shapes(name: str, small_input: bool) -> None:
    # Shapes only (abstract evaluation, no compilation): the full-width networks stay cheap.
    model = create_teacher(name, 7, small_input=small_input)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert set(variables) == {"params", "batch_stats"}
    logits = jax.eval_shape(model.apply, variables, images)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_bottleneck_resnet_runs() -> None:
    # Two stages are enough to run a bottleneck with and without stride; resnet8 runs the
    # basic block in the tests below.
    model = create_teacher("resnet26", 7, small_input=True, num_filters=4, stage_sizes=(1, 1))
    variables = _init(model)
    logits = jax.jit(model.apply)(variables, _images())
    assert logits.shape == (2, 7)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_registry_matches_resnet_depths() -> None:
    # Weighted layers: stem + 2 (basic) or 3 (bottleneck) convs per block + the head.
    for name, spec in TEACHERS.items():
        per_block = 2 if spec.block == "basic" else 3
        assert 2 + per_block * sum(spec.stage_sizes) == int(name.removeprefix("resnet"))


@pytest.mark.parametrize(("name", "count"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_torchvision(name: str, count: int) -> None:
    # Golden values: torchvision's model table (1000 classes; BN running stats are buffers).
    model = create_teacher(name, 1000)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == count


def test_unknown_teacher_and_override_raise() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        create_teacher("resnet7", 10)
    with pytest.raises(ValueError, match="width"):
        create_teacher("resnet8", 10, width=3)
    with pytest.raises(ValueError, match="block"):
        create_teacher("resnet8", 10, block="dense")


def test_batch_stats_update_only_in_train_mode(resnet8: tuple[ResNet, dict]) -> None:
    model, variables = resnet8
    images = _images() * 3 + 1
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    after = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    # Eval mode reads the running statistics and mutates nothing.
    out = model.apply(variables, images)
    again = model.apply(variables, images[:1])
    np.testing.assert_allclose(out[:1], again, rtol=1e-5, atol=1e-6)


def test_teacher_applies_its_own_normalisation(resnet8: tuple[ResNet, dict]) -> None:
    model, variables = resnet8
    teacher = Teacher.from_resnet(model, variables, MEAN, STD)
    images = _images(1)
    manual = model.apply(variables, (images - jnp.array(MEAN)) / jnp.array(STD))
    np.testing.assert_allclose(teacher(images), manual, rtol=1e-6, atol=1e-6)
    assert teacher.num_classes == 10


def test_no_gradient_reaches_the_teacher(resnet8: tuple[ResNet, dict]) -> None:
    model, variables = resnet8
    teacher = Teacher.from_resnet(model, variables, MEAN, STD)
    images = _images(2)

    def loss(t: Teacher, x: jax.Array) -> jax.Array:
        return jnp.sum(teacher_logits(t, x) ** 2)

    grads_t, grads_x = jax.grad(loss, argnums=(0, 1))(teacher, images)
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(grads_t.variables))
    assert not np.any(grads_x)


def test_teacher_under_jit_takes_variables_as_argument(resnet8: tuple[ResNet, dict]) -> None:
    model, variables = resnet8
    teacher = Teacher.from_resnet(model, variables, MEAN, STD, image_size=32)
    images = _images(3)
    traces = []

    def traced(t: Teacher, x: jax.Array) -> jax.Array:
        traces.append(1)
        return teacher_logits(t, x)

    step = jax.jit(traced)
    np.testing.assert_allclose(step(teacher, images), teacher(images), rtol=1e-5, atol=1e-6)
    # New weights in an equal wrapper reuse the compiled program and change the answer.
    scaled = jax.tree_util.tree_map(lambda v: v * 1.5, variables)
    other = Teacher.from_resnet(model, scaled, MEAN, STD, image_size=32)
    assert not np.allclose(step(other, images), step(teacher, images))
    assert len(traces) == 1
    # The weights are arguments of the lowered program, not constants folded into it.
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    assert len(jax.tree_util.tree_leaves(step.lower(teacher, images).args_info)) == n_leaves + 1


def test_teacher_resizes_and_checks_images(resnet8: tuple[ResNet, dict]) -> None:
    model, variables = resnet8
    teacher = Teacher.from_resnet(model, variables, MEAN, STD, image_size=32)
    # A student at 16x16 distils from a teacher trained at 32x32: the teacher sees the same
    # images, resized to its own resolution.
    small = _images(size=16)
    resized = jax.image.resize(small, (small.shape[0], 32, 32, 3), method="bilinear")
    np.testing.assert_allclose(teacher(small), teacher(resized), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        teacher(jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="std"):
        Teacher.from_resnet(model, variables, MEAN, (0.2, 0.0, 0.3))


def test_class_count_mismatch_names_both_counts(resnet8: tuple[ResNet, dict]) -> None:
    teacher = Teacher.from_resnet(*resnet8, MEAN, STD)
    check_teacher(teacher, 10)
    with pytest.raises(ValueError, match="teacher predicts 10 classes but the student has 100"):
        check_teacher(teacher, 100)


def test_from_deit_averages_the_two_heads() -> None:
    from deit.model import create_model, init_params

    model = create_model("deit_test_distilled_patch4_32", num_classes=5)
    variables = {"params": init_params(model, 0)}
    teacher = Teacher.from_deit(model, variables, MEAN, STD)
    images = _images(4)
    out = model.apply(variables, (images - jnp.array(MEAN)) / jnp.array(STD))
    expected = (out.cls_logits + out.dist_logits) / 2
    np.testing.assert_allclose(jax.jit(teacher_logits)(teacher, images), expected, atol=1e-5)
    assert teacher.num_classes == 5 and teacher.image_size == (32, 32)


def test_a_teacher_in_bfloat16_keeps_its_weights_and_float32_logits():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deit.teacher import Teacher, create_teacher

    net = create_teacher("resnet8", 10, small_input=True)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    fp32 = Teacher.from_resnet(net, variables, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 16)
    bf16 = fp32.with_dtype("bfloat16")
    assert bf16.apply_fn.model.dtype == jnp.bfloat16 and bf16.variables is fp32.variables
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
    a, b = np.asarray(fp32(x)), np.asarray(bf16(x))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=0, atol=0.05 * np.abs(a).max())
    assert not np.array_equal(a, b)  # it did compute in bfloat16
