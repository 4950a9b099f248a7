"""The DeiT model: shapes, registry, heads and token order, remat, dtypes, pos-embed resampling,
bad input, and its initialisation against a freshly built timm DeiT's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import deit
from deit.model import DeiT, resample_pos_embed
from deit.variants import REFERENCE_NAMES


def shapes(model: DeiT) -> dict:
    h, w = model.img_size if isinstance(model.img_size, tuple) else (model.img_size,) * 2
    x = jax.ShapeDtypeStruct((1, h, w, model.in_chans), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def test_spec_worked_example():
    image = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 3))
    out = deit.deit_forward(
        0, image, patch_size=2, d_model=8, num_heads=2, d_ff=16, num_layers=2, num_classes=4
    )
    assert out.shape == (8,)
    assert np.all(np.isfinite(out))
    # Same seed, same numbers; another seed, other parameters.
    again = deit.deit_forward(0, image, 2, 8, 2, 16, 2, 4)
    np.testing.assert_array_equal(out, again)
    assert not np.allclose(out, deit.deit_forward(1, image, 2, 8, 2, 16, 2, 4))
    # The two halves are the class head then the distillation head of the same model.
    model = DeiT(
        num_classes=4, img_size=4, patch_size=2, embed_dim=8, depth=2, num_heads=2, mlp_dim=16
    )
    variables = model.init(jax.random.PRNGKey(0), image)
    ref = model.apply(variables, image)
    np.testing.assert_allclose(out[:4], ref.cls_logits, rtol=1e-6)
    np.testing.assert_allclose(out[4:], ref.dist_logits, rtol=1e-6)
    assert variables["params"]["pos_embed"].shape == (1, 6, 8)  # 4 patches + cls + dist


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_parameter_counts_are_timms(name):
    """The same parameter count as timm's model of that name, and the same tensor sizes one by
    one (built on torch's meta device: shapes only, nothing allocated or initialised)."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    ref_sizes = sorted(p.numel() for p in ref.parameters())
    ours = shapes(deit.create_model(name))
    assert deit.param_count(ours) == sum(ref_sizes)
    assert sorted(math.prod(p.shape) for p in jax.tree_util.tree_leaves(ours)) == ref_sizes


def test_registry_names_and_aliases():
    names = deit.list_models()
    for name in REFERENCE_NAMES:
        assert name in names
    assert deit.create_model("tiny-distilled").embed_dim == 192
    with pytest.raises(ValueError, match="unknown model 'deit_huge'"):
        deit.create_model("deit_huge")
    with pytest.raises(ValueError, match="unknown override"):
        deit.create_model("deit_test_patch4_32", colour="red")


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit_base_patch16_384"])
def test_flops_equal_torchs_count_of_timms_model(name):
    """torch's `FlopCounterMode` over timm's forward (conv, matmuls and attention's two batched
    matmuls, 2 FLOPs a multiply-add; run on the meta device, shapes only) counts what
    `flops_per_image` does, exactly."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False).eval()
        x = torch.empty(1, *ref.default_cfg["input_size"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ref(x)
    flops = deit.flops_per_image(deit.create_model(name))
    assert flops == counter.get_total_flops()
    if name == "deit_tiny_distilled_patch16_224":  # the published 1.26 GMACs (the figure)
        assert flops == pytest.approx(2.52e9, rel=2e-3)


@pytest.fixture(scope="module")
def tiny():
    model = deit.create_model("deit_test_distilled_patch4_32")
    return model, deit.init_params(model, 0)


def test_single_and_batched_shapes(tiny):
    model, params = tiny
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    out = model.apply({"params": params}, x)
    assert out.cls_logits.shape == out.dist_logits.shape == out.logits.shape == (3, 10)
    single = model.apply({"params": params}, x[1])
    assert single.cls_logits.shape == (10,)
    np.testing.assert_allclose(single.cls_logits, out.cls_logits[1], atol=1e-5)
    np.testing.assert_allclose(out.logits, (out.cls_logits + out.dist_logits) / 2, rtol=1e-6)


def test_heads_are_separate_and_differ(tiny):
    model, params = tiny
    assert set(params) >= {"cls_token", "dist_token", "pos_embed", "cls_head", "dist_head", "norm"}
    assert not np.allclose(params["cls_head"]["kernel"], params["dist_head"]["kernel"])
    out = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)))
    assert not np.allclose(out.cls_logits, out.dist_logits)


def test_token_order_cls_then_dist(tiny):
    """Token 0 feeds cls_head and token 1 feeds dist_head: swapping the tokens swaps the heads'
    inputs, which we check through features (num_classes=0)."""
    model, params = tiny
    feats = model.clone(num_classes=0)
    body = {k: v for k, v in params.items() if k not in ("cls_head", "dist_head")}
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    f = feats.apply({"params": body}, x)
    out = model.apply({"params": params}, x)
    head = params["cls_head"]
    np.testing.assert_allclose(
        f.cls_logits @ head["kernel"] + head["bias"], out.cls_logits, atol=1e-5
    )
    head = params["dist_head"]
    np.testing.assert_allclose(
        f.dist_logits @ head["kernel"] + head["bias"], out.dist_logits, atol=1e-5
    )
    # pos_embed covers the two prefix tokens and the 8x8 grid.
    assert params["pos_embed"].shape == (1, 2 + 64, 32)


def test_plain_deit_has_one_head():
    model = deit.create_model("deit_test_patch4_32")
    params = deit.init_params(model)
    assert "dist_token" not in params and "dist_head" not in params
    assert params["pos_embed"].shape == (1, 1 + 64, 32)
    out = model.apply({"params": params}, jnp.zeros((32, 32, 3)))
    assert out.dist_logits is None
    np.testing.assert_array_equal(out.logits, out.cls_logits)


def test_train_mode_uses_dropout_rngs(tiny):
    model, params = tiny
    model = model.clone(drop_path_rate=0.5, drop_rate=0.1)
    x = jnp.ones((4, 32, 32, 3))
    a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a.cls_logits, b.cls_logits)
    e1, e2 = model.apply({"params": params}, x), model.apply({"params": params}, x)
    np.testing.assert_array_equal(e1.cls_logits, e2.cls_logits)


def test_remat_gives_the_same_loss_and_gradients(tiny):
    model, params = tiny
    model = model.clone(drop_path_rate=0.3, drop_rate=0.1)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))

    def loss(m: DeiT, p: dict) -> jax.Array:
        out = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
        return jnp.sum(out.cls_logits**2) + jnp.sum(out.dist_logits)

    plain = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss(model.clone(remat=True), p)))(params)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    grads = (remat[1], plain[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)
    # Each block is one rematerialised region of the traced program.
    jaxpr = str(jax.make_jaxpr(lambda p: loss(model.clone(remat=True), p))(params))
    assert jaxpr.count("remat") == model.depth
    assert "remat" not in str(jax.make_jaxpr(lambda p: loss(model, p))(params))


def test_bfloat16_compute_keeps_float32_params(tiny):
    model, params = tiny
    bf = model.clone(dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(deit.init_params(bf)))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
    lo = bf.apply({"params": params}, x)
    hi = model.apply({"params": params}, x)
    assert lo.cls_logits.dtype == jnp.float32
    # bf16 has 8 mantissa bits; logits of this tiny model are O(0.1).
    np.testing.assert_allclose(lo.logits, hi.logits, atol=5e-2)


def test_resample_pos_embed_keeps_prefix_tokens():
    pe = jax.random.normal(jax.random.PRNGKey(0), (1, 2 + 16, 8))
    out = resample_pos_embed(pe, (6, 6), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 36, 8)
    np.testing.assert_array_equal(out[:, :2], pe[:, :2])
    # A constant grid stays constant under the (normalised) bicubic kernel.
    flat = jnp.concatenate([pe[:, :2], jnp.ones((1, 16, 8))], axis=1)
    np.testing.assert_allclose(resample_pos_embed(flat, (6, 6), 2)[:, 2:], 1.0, atol=1e-5)
    np.testing.assert_array_equal(resample_pos_embed(pe, (4, 4), 2), pe)  # same grid: unchanged
    with pytest.raises(ValueError, match="not square"):
        resample_pos_embed(pe[:, :-1], (6, 6), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(img_size=30, patch_size=4), "not divisible by patch_size 4"),
        (dict(embed_dim=30, num_heads=4), "d_model 30 is not divisible by num_heads 4"),
        (dict(drop_path_rate=1.5), "drop_path_rate 1.5"),
    ],
)
def test_bad_architecture_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeiT(
            **{
                "num_classes": 4,
                "embed_dim": 32,
                "num_heads": 2,
                "depth": 1,
                "mlp_dim": 8,
                **kwargs,
            }
        )


def test_bad_input_raises_value_error(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"expected \(B, H, W, C\)"):
        model.apply({"params": params}, jnp.zeros((32, 32)))
    with pytest.raises(ValueError, match="1 channels but the model expects 3"):
        model.apply({"params": params}, jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="image is 48x48 but the model was built for 32x32"):
        model.apply({"params": params}, jnp.zeros((48, 48, 3)))
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        deit.deit_forward(0, jnp.zeros((5, 4, 3)), 2, 8, 2, 16, 1, 4)
    with pytest.raises(ValueError, match="one \\(H, W, C\\) image"):
        deit.deit_forward(0, jnp.zeros((1, 4, 4, 3)), 2, 8, 2, 16, 1, 4)


# ---------------------------------------------------------------------------------------------
# Initialisation against timm's


def _named(timm_key: str, our_key: str) -> tuple:
    return (lambda k: k == timm_key, lambda k: k == our_key)


def _suffix(timm_end: str, our_end: str) -> tuple:
    return (lambda k: k.endswith(timm_end), lambda k: k.endswith(our_end))


# Parameter family -> (which timm state-dict keys, which of our parameter paths) belong to it.
FAMILIES = {
    "qkv kernel": _suffix("attn.qkv.weight", "attn/qkv/kernel"),
    "attn proj kernel": _suffix("attn.proj.weight", "attn/proj/kernel"),
    "fc1 kernel": _suffix("mlp.fc1.weight", "mlp/fc1/kernel"),
    "fc2 kernel": _suffix("mlp.fc2.weight", "mlp/fc2/kernel"),
    "block linear biases": (
        lambda k: k.startswith("blocks.") and k.endswith("bias") and ".norm" not in k,
        lambda k: k.startswith("blocks_") and k.endswith("bias") and "/norm" not in k,
    ),
    "LayerNorm scales": (
        lambda k: "norm" in k and k.endswith("weight"),
        lambda k: "norm" in k and k.endswith("scale"),
    ),
    "LayerNorm biases": (
        lambda k: "norm" in k and k.endswith("bias"),
        lambda k: "norm" in k and k.endswith("bias"),
    ),
    "patch-embed kernel": _named("patch_embed.proj.weight", "patch_embed/proj/kernel"),
    "patch-embed bias": _named("patch_embed.proj.bias", "patch_embed/proj/bias"),
    "pos_embed": _named("pos_embed", "pos_embed"),
    "cls_token": _named("cls_token", "cls_token"),
    "dist_token": _named("dist_token", "dist_token"),
    "cls head kernel": _named("head.weight", "cls_head/kernel"),
    "cls head bias": _named("head.bias", "cls_head/bias"),
    "dist head kernel": _named("head_dist.weight", "dist_head/kernel"),
    "dist head bias": _named("head_dist.bias", "dist_head/bias"),
}


def _families(flat: dict[str, np.ndarray], side: int) -> dict[str, np.ndarray]:
    """`flat` (name -> array) gathered per family; `side` 0 for timm's names, 1 for ours."""
    return {
        family: np.concatenate([v.ravel() for k, v in flat.items() if tests[side](k)])
        for family, tests in FAMILIES.items()
    }


def _timm_families(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return _families({k: v.detach().numpy() for k, v in model.state_dict().items()}, 0)


def _our_families(params: dict) -> dict[str, np.ndarray]:
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    return _families(flat, 1)


def _kurtosis(x: np.ndarray) -> float:
    z = (x - x.mean()) / x.std()
    return float(np.mean(z**4))


def _assert_same_distribution(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    """Both samples come from one zero-mean distribution, to 5 standard errors of the sample
    sizes: mean, std, kurtosis (3 for a normal, 1.8 for a uniform, 2.4 for a normal cut at
    ±2σ) and, for large samples, the extremes."""
    n, m = ours.size, ref.size
    sd = ref.std()
    assert abs(ours.mean() - ref.mean()) <= 5 * sd * math.sqrt(1 / n + 1 / m), name
    # the standard error of a normal sample's std is std / sqrt(2n); a uniform's is smaller
    assert abs(ours.std() / sd - 1) <= 5 * math.sqrt(1 / (2 * n) + 1 / (2 * m)), name
    assert abs(_kurtosis(ours) - _kurtosis(ref)) <= 5 * math.sqrt(24 / n + 24 / m), name
    if min(n, m) >= 1000:
        # The largest of n draws: at a uniform's bound, or ~sqrt(2 ln n) sigmas out for a
        # normal, whose spread is a fraction of a sigma; 25% covers both and catches a cut.
        for ours_x, ref_x in ((ours.max(), ref.max()), (-ours.min(), -ref.min())):
            assert abs(ours_x / ref_x - 1) <= 0.25, (name, ours_x, ref_x)


def test_init_matches_timm_deit_family_by_family():
    """A two-block DeiT-Ti (64 px: 16 patches) against timm's `deit_tiny_distilled_patch16_224`
    built the same way (pretrained=False), parameter family by family. timm's init for DeiT:
    Linear kernels (blocks and heads), pos_embed and dist_token `trunc_normal_(std=.02)`, which
    cuts at ±2 absolute and so is N(0, 0.02²); cls_token N(0, 1e-6²); Linear biases 0;
    LayerNorm 1 and 0; the patch-embed conv left at torch's default, kernel and bias
    U(±1/√fan_in). No family differs on purpose."""
    torch.manual_seed(0)
    ref = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2
    )
    ref = _timm_families(ref)
    model = deit.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2)
    ours = _our_families(deit.init_params(model, 0))
    assert set(ours) == set(ref)
    for name, ref_values in ref.items():
        assert ours[name].size == ref_values.size, name
        if ref_values.std() == 0:  # constant families: the same constant
            np.testing.assert_array_equal(ours[name], ref_values[0], err_msg=name)
        else:
            _assert_same_distribution(name, ours[name], ref_values)
    # And the absolute scales timm's code states, so both cannot drift together.
    for name in ("qkv kernel", "fc2 kernel", "cls head kernel", "pos_embed"):
        assert ours[name].std() == pytest.approx(0.02, rel=0.03), name
    bound = 1 / math.sqrt(16 * 16 * 3)
    assert np.abs(ours["patch-embed kernel"]).max() <= bound
    assert ours["patch-embed kernel"].std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert ours["cls_token"].std() == pytest.approx(1e-6, rel=0.3)


def test_patch_embed_init_follows_fan_in(tiny):
    """The patch-embed bound comes from this model's fan-in (4 x 4 x 3 = 48 here), as torch's
    default init of the same `Conv2d` has it."""
    _, params = tiny
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)
    bound = 1 / math.sqrt(48)
    for ours, ref in (
        (params["patch_embed"]["proj"]["kernel"], conv.weight),
        (params["patch_embed"]["proj"]["bias"], conv.bias),
    ):
        ours, ref = np.asarray(ours).ravel(), ref.detach().numpy().ravel()
        assert ours.size == ref.size
        assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound
        _assert_same_distribution("patch embed", ours, ref)
    kernel = np.asarray(params["patch_embed"]["proj"]["kernel"])
    assert np.abs(kernel).max() >= 0.95 * bound  # uses the whole range, not a narrower one


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_path_matches_the_einsums(dtype, monkeypatch):
    """The GPU path (`jax.nn.dot_product_attention` on q, k, v sliced from qkv in (B, T, h, d))
    gives what the CPU path gives; checked on CPU by forcing it (`DEIT_ATTENTION=xla`: XLA's own
    implementation of the function the cuDNN kernel implements on the GPU)."""
    model = deit.create_model("deit_test_distilled_patch4_32", dtype=dtype)
    variables = {"params": deit.init_params(model, 1)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    out = {}
    for choice in ("einsum", "xla"):
        monkeypatch.setenv("DEIT_ATTENTION", choice)
        out[choice] = np.asarray(jax.jit(model.apply)(variables, x).logits, np.float32)
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(out["xla"], out["einsum"], rtol=0, atol=tol)
    assert not np.array_equal(out["xla"], np.zeros_like(out["xla"]))


def test_attention_kernel_is_chosen_by_backend_and_refused_where_it_cannot_run(monkeypatch):
    from deit.errors import InputError
    from deit.layers import attention_kernel, f32_outputs

    monkeypatch.delenv("DEIT_ATTENTION", raising=False)
    assert jax.default_backend() == "cpu"
    assert attention_kernel(jnp.bfloat16, 64) == "einsum"  # the GPU's cudnn is never picked here
    assert f32_outputs(jnp.bfloat16) and not f32_outputs(jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_kernel(jnp.bfloat16, 64) == "cudnn"
    assert attention_kernel(jnp.float16, 32) == "cudnn"
    assert attention_kernel(jnp.float32, 64) == "einsum"  # cuDNN's fused kernel has no fp32
    assert attention_kernel(jnp.bfloat16, 12) == "einsum"  # head_dim not a multiple of 8
    assert attention_kernel(jnp.bfloat16, 256) == "einsum"
    assert not f32_outputs(jnp.bfloat16)  # cuBLAS writes bf16, accumulating in float32
    monkeypatch.setenv("DEIT_ATTENTION", "cudnn")
    with pytest.raises(InputError, match=r"DEIT_ATTENTION=cudnn needs .* float32, head_dim 64"):
        attention_kernel(jnp.float32, 64)
    monkeypatch.setenv("DEIT_ATTENTION", "flash")
    with pytest.raises(InputError, match=r"DEIT_ATTENTION='flash'; expected one of"):
        attention_kernel(jnp.bfloat16, 64)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setenv("DEIT_ATTENTION", "cudnn")
    with pytest.raises(InputError, match="got cpu, bfloat16"):
        attention_kernel(jnp.bfloat16, 64)


# ---------------------------------------------------------------------------------------------
# Any input size (`dynamic_img_size=True`) against timm's


def _perturbed_timm(distilled: bool) -> torch.nn.Module:
    """timm's tiny DeiT (the `deit_test_*` shapes) with `dynamic_img_size`, every tensor
    perturbed so biases and tokens carry signal."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    ref = cls(
        num_classes=10,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        dynamic_img_size=True,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return ref.eval()


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "plain"])
def test_dynamic_img_size_logits_match_timm_at_three_sizes(distilled):
    """The model's own 32x32, 48x48 (the position embedding upsampled) and 24x40 (down one way,
    up the other), fp32, within 1e-5 of timm's `dynamic_img_size=True` model; under `jit` each
    size is traced once, and a repeated call at a size compiles nothing."""
    from deit import convert

    ref = _perturbed_timm(distilled)
    name = "deit_test_distilled_patch4_32" if distilled else "deit_test_patch4_32"
    model = deit.create_model(name, dynamic_img_size=True)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    variables = {"params": convert.from_torch(sd, model)}
    traced = []

    def logits(v, x):
        traced.append(x.shape[1:3])
        return model.apply(v, x).logits

    run = jax.jit(logits)
    sizes = [(32, 32), (48, 48), (24, 40)]
    for h, w in sizes:
        x = np.random.default_rng(h * w).normal(size=(2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        xj = x.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(run(variables, xj), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(run(variables, xj + 0), want, rtol=0, atol=1e-5)
    assert traced == sizes


def test_dynamic_img_size_refuses_sides_not_divisible_by_the_patch(tiny):
    model, params = tiny
    dynamic = model.clone(dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"^image is 30x32, not divisible by patch_size 4; expect"):
        dynamic.apply({"params": params}, jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"^image is 2x8, not divisible by patch_size 4"):
        dynamic.apply({"params": params}, jnp.zeros((2, 8, 3)))
    # The default stays strict, and says how to lift it.
    with pytest.raises(ValueError, match=r"built for 32x32; .* or with dynamic_img_size=True"):
        model.apply({"params": params}, jnp.zeros((1, 48, 40, 3)))
    assert dynamic.apply({"params": params}, jnp.zeros((48, 40, 3))).cls_logits.shape == (10,)


def test_dynamic_pos_embed_over_patches_only_matches_timm():
    """A position embedding without prefix rows (timm's `no_embed_class`, DeiT III): the row
    count is read from its shape, and the grid is resampled as timm's does with no prefix."""
    from timm.layers import resample_abs_pos_embed

    model = DeiT(num_classes=4, img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    pe = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
    for hw in [(24, 40), (8, 12)]:
        want = resample_abs_pos_embed(
            torch.from_numpy(pe), (hw[0] // 4, hw[1] // 4), old_size=(4, 4), num_prefix_tokens=0
        )
        got = model._dynamic_pos_embed(jnp.asarray(pe), hw)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(model._dynamic_pos_embed(jnp.asarray(pe), (16, 16)), pe)
