"""Per-dtype XLA compiler options: which programs get them, and that they keep the numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit import compiler
from deit.compiler import YNN_FUSION_TYPE, compiler_options
from deit.model import create_model, init_params


@pytest.fixture
def fresh_cache():
    compiler._tuned_backend.cache_clear()
    yield
    compiler._tuned_backend.cache_clear()


def test_float32_on_cpu_turns_ynn_fusions_off(fresh_cache):
    measured = compiler.cpu_isa() in compiler.ISA_LEVELS
    expected = {YNN_FUSION_TYPE: ""} if jax.__version_info__[:2] == (0, 10) and measured else None
    assert compiler_options(jnp.float32) == expected
    assert compiler_options("float32") == expected


CPUINFO = {
    "amx_bf16": "fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
    "avx512_bf16": "fpu sse2 avx avx2 avx512f avx512_bf16",
    "avx512f": "fpu sse2 avx avx2 avx512f avx512cd",
    "avx2": "fpu sse2 avx avx2 fma",
    "other": "fpu sse2 avx",
}


@pytest.mark.parametrize("isa", sorted(CPUINFO))
def test_the_isa_level_is_read_from_cpuinfo(isa, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {CPUINFO[isa]}\n\n")
    assert compiler.cpu_isa(str(info)) == isa


@pytest.mark.parametrize(
    ("vendor_id", "vendor"),
    [("GenuineIntel", "intel"), ("AuthenticAMD", "amd"), ("HygonGenuine", "other")],
)
def test_the_vendor_is_read_from_cpuinfo(vendor_id, vendor, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: {vendor_id}\nflags\t\t: fpu avx2\n\n")
    assert compiler.cpu_vendor(str(info)) == vendor


def test_an_unmeasured_architecture_keeps_xla_defaults(tmp_path, fresh_cache):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n\n")  # aarch64: no flags line
    assert compiler.cpu_isa(str(arm)) == "other"
    assert compiler.cpu_isa(str(tmp_path / "missing")) == "other"
    assert compiler.cpu_vendor(str(arm)) == "other"
    assert compiler.cpu_vendor(str(tmp_path / "missing")) == "other"
    assert compiler_options(jnp.float32, isa="other") is None
    if jax.__version_info__[:2] == (0, 10):
        assert compiler_options(jnp.float32, isa="avx2") == {YNN_FUSION_TYPE: ""}
        assert compiler_options(jnp.bfloat16, isa="amx_bf16") is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, None])
def test_other_dtypes_keep_xla_defaults(dtype, fresh_cache):
    assert compiler_options(dtype) is None


@pytest.mark.parametrize(
    "env",
    [
        {"DEIT_XLA_OPTIONS": "0"},
        {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},
    ],
)
def test_user_choice_wins(env, monkeypatch, fresh_cache):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert compiler_options(jnp.float32) is None


def test_options_compile_and_keep_logits(fresh_cache):
    model = create_model("deit_test_distilled_patch4_32")
    params = init_params(model, 0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))

    def fn(p, x):
        return model.apply({"params": p}, x).logits

    tuned = jax.jit(fn, compiler_options=compiler_options(jnp.float32))(params, x)
    plain = jax.jit(fn)(params, x)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), atol=1e-5, rtol=1e-5)


def test_deit_jit_passes_the_options_and_keeps_the_numbers(monkeypatch, fresh_cache):
    import deit

    seen = []
    real = jax.jit
    monkeypatch.setattr(jax, "jit", lambda f, **kw: seen.append(kw) or real(f, **kw))
    model = create_model("deit_test_distilled_patch4_32")
    variables = {"params": init_params(model, 0)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    fast = deit.jit(model.apply, static_argnames=("train",))(variables, x, train=False).logits
    assert seen[-1].get("compiler_options") == compiler_options(jnp.float32)
    assert seen[-1]["static_argnames"] == ("train",)
    deit.jit(model.apply, dtype="bfloat16")
    assert "compiler_options" not in seen[-1]  # bf16 keeps XLA's defaults
    plain = real(model.apply)(variables, x).logits
    np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), rtol=1e-5, atol=1e-6)


@pytest.fixture
def restore_cache_dir():
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_compile_cache_is_on_by_default_and_yields_to_the_user(
    tmp_path, monkeypatch, restore_cache_dir
):
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("DEIT_COMPILE_CACHE", "0")
    assert compiler.use_compile_cache(tmp_path / "a") is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("DEIT_COMPILE_CACHE", "1")
    assert compiler.use_compile_cache(tmp_path / "a", enabled=False) is None
    assert compiler.use_compile_cache(tmp_path / "a") == str(tmp_path / "a")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compiler.CACHE_MIN_COMPILE_S
    # A folder chosen already (JAX_COMPILATION_CACHE_DIR, jax.config) is kept.
    assert compiler.use_compile_cache(tmp_path / "b") == str(tmp_path / "a")
