"""Checkpoint conversion: parity with the live timm and Hugging Face references, file formats,
refusal of unsafe pickles, strict key checking and the end-to-end `convert_checkpoint`.

References are randomly initialised (nothing downloads) and every tensor is perturbed so biases,
LayerNorm affines and the zero-initialised HF tokens carry signal. Run with `-s` to see the
measured max |Δ| per head (the parity table, docs/parity.md).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from deit import convert, create_model, export, init_params, resample_pos_embed

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TOL = 1e-5
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_labels=10,
)
HF_TI = dict(
    hidden_size=192,
    num_hidden_layers=12,
    num_attention_heads=3,
    intermediate_size=768,
    image_size=224,
    patch_size=16,
    num_labels=1000,
)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add N(0, 0.02²) to every tensor so no parameter keeps its trivial init; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return module.eval()


def timm_model(variant: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)  # the references draw their init from torch's global generator
    if variant == "deit_test_distilled_patch4_32":
        model = VisionTransformerDistilled(num_classes=10, **TINY, **kwargs)
    elif variant == "deit_test_patch4_32":
        model = VisionTransformer(num_classes=10, **TINY, **kwargs)
    else:
        model = timm.create_model(variant, pretrained=False, **kwargs)
    return perturb(model, seed)


def images(size: int, batch: int = 2, chans: int = 3, seed: int = 0):
    """The same images as NCHW torch (reference) and NHWC numpy (ours)."""
    x = np.random.default_rng(seed).normal(size=(batch, chans, size, size)).astype(np.float32)
    return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def timm_heads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Class, distillation and averaged logits; timm's eval forward only returns the average."""
    with torch.no_grad():
        avg = model(x)
        if not isinstance(model, VisionTransformerDistilled):
            return {"cls": avg.numpy(), "avg": avg.numpy()}
        feats = model.forward_features(x)
        cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    # The two heads taken apart must recombine into timm's own eval output.
    np.testing.assert_allclose(((cls + dist) / 2).numpy(), avg.numpy(), rtol=0, atol=1e-6)
    return {"cls": cls.numpy(), "dist": dist.numpy(), "avg": avg.numpy()}


def flax_heads(model, params, x: np.ndarray) -> dict[str, np.ndarray]:
    out = jax.jit(model.apply)({"params": params}, x)
    heads = {"cls": out.cls_logits, "avg": out.logits}
    if out.dist_logits is not None:
        heads["dist"] = out.dist_logits
    return {k: np.asarray(v) for k, v in heads.items()}


def assert_parity(label: str, ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    deltas = {k: float(np.abs(ours[k] - ref[k]).max()) for k in ref}
    print(f"\nPARITY {label}: " + " ".join(f"{k}={v:.2e}" for k, v in deltas.items()))
    assert all(v <= TOL for v in deltas.values()), deltas


def numpy_sd(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- timm parity

TIMM_CASES = [
    ("deit_tiny_distilled_patch16_224", 224),
    ("deit_tiny_patch16_224", 224),
    ("deit_test_distilled_patch4_32", 32),
    ("deit_test_patch4_32", 32),
]


@pytest.mark.parametrize(("variant", "size"), TIMM_CASES)
def test_timm_parity(variant: str, size: int) -> None:
    ref = timm_model(variant)
    model = create_model(variant)
    params = convert.from_torch(numpy_sd(ref), model)
    xt, xj = images(size)
    assert_parity(f"{variant} vs timm", flax_heads(model, params, xj), timm_heads(ref, xt))


@pytest.mark.parametrize(("variant", "size"), TIMM_CASES)
def test_flax_to_timm_round_trip(variant: str, size: int) -> None:
    model = create_model(variant)
    rng = np.random.default_rng(1)
    noise = lambda p: np.asarray(p) + 0.02 * rng.standard_normal(p.shape, np.float32)
    params = jax.tree_util.tree_map(noise, init_params(model, 0))
    state_dict = convert.to_torch(params, model)
    ref = timm_model(variant, seed=5)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    xt, xj = images(size, seed=1)
    assert_parity(f"{variant} flax->timm", flax_heads(model, params, xj), timm_heads(ref, xt))
    again = export.flatten(convert.from_torch(state_dict, model))
    assert all(np.array_equal(v, again[k]) for k, v in export.flatten(params).items())


# ----------------------------------------------------------------------------- HF parity


def hf_to_hub_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The names of the Hub files (transformers < 5) for a live transformers-5 state dict."""
    renames = [
        (r"deit\.layers\.", "deit.encoder.layer."),
        (
            r"attention\.([qkv])_proj",
            lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m[1]],
        ),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def hf_model(cls_name: str, config: dict, seed: int = 0) -> torch.nn.Module:
    cfg = transformers.DeiTConfig(layer_norm_eps=1e-6, hidden_act="gelu", **config)
    torch.manual_seed(seed)
    return perturb(getattr(transformers, cls_name)(cfg), seed)


@pytest.mark.parametrize(
    ("variant", "config", "names"),
    [
        ("deit_test_distilled_patch4_32", HF_TINY, "live"),
        ("deit_test_distilled_patch4_32", HF_TINY, "hub"),
        ("deit_tiny_distilled_patch16_224", HF_TI, "live"),
    ],
)
def test_hf_teacher_parity(variant: str, config: dict, names: str) -> None:
    ref = hf_model("DeiTForImageClassificationWithTeacher", config)
    sd = numpy_sd(ref)
    sd = hf_to_hub_names(sd) if names == "hub" else sd
    assert convert.detect_layout(sd) == "hf"
    model = create_model(variant)
    params = convert.from_torch(sd, model)
    xt, xj = images(config["image_size"])
    with torch.no_grad():
        out = ref(pixel_values=xt)
    want = {"cls": out.cls_logits, "dist": out.distillation_logits, "avg": out.logits}
    want = {k: v.numpy() for k, v in want.items()}
    assert_parity(
        f"{variant} vs HF WithTeacher ({names} names)", flax_heads(model, params, xj), want
    )


def test_hf_single_head_parity() -> None:
    ref = hf_model("DeiTForImageClassification", HF_TINY)
    sd = numpy_sd(ref)
    with pytest.raises(ValueError, match="with_dist_head=False"):
        convert.from_torch(sd, create_model("deit_test_distilled_patch4_32"))
    model = create_model("deit_test_distilled_patch4_32", with_dist_head=False)
    params = convert.from_torch(sd, model)
    xt, xj = images(32)
    with torch.no_grad():
        logits = ref(pixel_values=xt).logits.numpy()
    assert_parity(
        "deit_test_distilled_patch4_32 vs HF single head",
        flax_heads(model, params, xj),
        {"cls": logits, "avg": logits},
    )
    # Fine-tuning from it: heads dropped, a two-head model gets fresh ones.
    fresh = convert.from_torch(sd, create_model("deit_test_distilled_patch4_32"), drop_heads=True)
    assert fresh["dist_head"]["kernel"].shape == (32, 10)


def test_hf_bare_model_features() -> None:
    """A bare `DeiTModel` (no `deit.` prefix, a pooler) into a head-less model: token features."""
    ref = hf_model("DeiTModel", HF_TINY)
    sd = numpy_sd(ref)
    assert "pooler.dense.weight" in sd and convert.detect_layout(sd) == "hf"
    model = create_model("deit_test_distilled_patch4_32", num_classes=0)
    params = convert.from_torch(sd, model)
    xt, xj = images(32)
    with torch.no_grad():
        tokens = ref(pixel_values=xt).last_hidden_state.numpy()
    out = model.apply({"params": params}, xj)
    assert np.abs(np.asarray(out.cls_logits) - tokens[:, 0]).max() <= TOL
    assert np.abs(np.asarray(out.dist_logits) - tokens[:, 1]).max() <= TOL


# ----------------------------------------------------------------------------- file formats


def format_tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 7
    return {
        "f32": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
        "f16": (base / 3).half(),
        "bf16": (base - 2).bfloat16(),
        "i64": torch.arange(5) - 2,
        "flag": torch.tensor([True, False]),
        "transposed": base.t(),
        "sliced": base[1:5, 1::3],
        "offset": base.flatten()[7:19],
        "shares_base": base,
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }


def expected_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".pt", ".bin"])
def test_load_torch_files(tmp_path, legacy: bool, suffix: str) -> None:
    tensors = format_tensors()
    path = tmp_path / f"ckpt{suffix}"
    wrapped = {
        "model": {f"module.{k}": v for k, v in tensors.items()},
        "args": argparse.Namespace(lr=5e-4, model="deit"),
        "epoch": 3,
    }
    torch.save(wrapped, path, _use_new_zipfile_serialization=not legacy)
    loaded = convert.load_state_dict(path)
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        want = expected_numpy(t)
        assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape, key
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)


def test_state_dict_wrapper_and_parameters(tmp_path) -> None:
    model = timm_model("deit_test_distilled_patch4_32")
    torch.save({"state_dict": dict(model.named_parameters())}, tmp_path / "p.pth")
    loaded = convert.load_state_dict(tmp_path / "p.pth")
    assert all(np.array_equal(loaded[k], v) for k, v in numpy_sd(model).items())


def test_load_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    # safetensors stores no views: each tensor gets its own copy.
    tensors = {k: v.contiguous().clone() for k, v in format_tensors().items()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = convert.load_state_dict(tmp_path / "w.safetensors")
    for key, t in tensors.items():
        np.testing.assert_array_equal(loaded[key], expected_numpy(t), err_msg=key)
    assert loaded["bf16"].dtype == np.float32 and loaded["f16"].dtype == np.float16


def test_reading_needs_no_torch(tmp_path) -> None:
    """In a process where `import torch` fails, .pth files (both formats) still convert."""
    sd = timm_model("deit_test_distilled_patch4_32").state_dict()
    torch.save({"model": sd}, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from deit import convert, create_model\n"
        "model = create_model('deit_test_distilled_patch4_32')\n"
        "for name in ('zip.pth', 'legacy.pth'):\n"
        f"    convert.from_torch(convert.load_state_dict({str(tmp_path)!r} + '/' + name), model)\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class Payload:
    """Pickles as a call to os.system: loading it with plain pickle creates `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Custom:
    """A harmless but unknown class: still refused, the allow-list has no exceptions."""


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle", "custom-class"])
def test_unsafe_pickle_is_refused(tmp_path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    weights = {"w": torch.ones(2)}
    if kind == "plain-pickle":
        # torch's own pickling of tensors (storage._load_from_bytes) would be refused first.
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}, "x": Payload(str(marker))}))
        live = tmp_path / "LIVE"
        pickle.loads(pickle.dumps(Payload(str(live))))  # the payload does run under pickle
        assert live.exists()
    elif kind == "custom-class":
        torch.save({"model": weights, "x": Custom()}, path)
    else:
        torch.save(
            {"model": weights, "x": Payload(str(marker))},
            path,
            _use_new_zipfile_serialization=kind == "zip",
        )
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth: it names") as err:
        convert.load_state_dict(path)
    assert ("Custom" if kind == "custom-class" else "system") in str(err.value)
    assert not marker.exists()


def damaged_pickles() -> list[bytes]:
    """Files that once escaped as MemoryError / OverflowError: length fields of 2^40 and 2^63
    bytes (BINBYTES8, FRAME), then seeded random bytes with and without a pickle header."""
    files = [
        b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little"),
        b"\x80\x04\x8e" + b"\xff" * 8,
        b"\x80\x04\x95" + b"\xff" * 8,
        b"\x80\x02B" + b"\xff" * 4,
    ]
    for seed in range(300):
        rng = np.random.default_rng(seed)
        files.append((b"\x80\x02" if seed % 2 else b"") + rng.bytes(int(rng.integers(1, 512))))
    return files


def test_a_damaged_file_is_a_one_line_error_never_a_memory_error(tmp_path) -> None:
    path = tmp_path / "damaged.pth"
    for content in damaged_pickles():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"damaged\.pth"):
            convert.load_state_dict(path)


def test_unreadable_files(tmp_path) -> None:
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.ckpt.*\.safetensors"):
        convert.load_state_dict(tmp_path / "w.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        convert.load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        convert.load_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        convert.save_torch({}, tmp_path / "out.pth")


# ----------------------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, np.ndarray]:
    return numpy_sd(timm_model("deit_test_distilled_patch4_32"))


def test_all_problems_in_one_error(tiny_sd) -> None:
    sd = dict(tiny_sd)
    del sd["blocks.1.norm1.weight"]
    sd["blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["head.weight"] = sd["head.weight"][:7]
    sd["pos_embed"] = sd["pos_embed"][..., :16]  # another width: not resampled
    with pytest.raises(ValueError) as err:
        convert.from_torch(sd, create_model("deit_test_distilled_patch4_32"))
    text = str(err.value)
    # A wrongly shaped array is listed once, with both shapes (not as missing too).
    assert [line for line in text.splitlines() if "pos_embed" in line] == [
        "    pos_embed (1, 66, 16) -> pos_embed (1, 66, 16), the model expects pos_embed "
        "(1, 66, 32)"
    ]
    assert len([line for line in text.splitlines() if "head.weight" in line]) == 1
    for part in (
        "missing",
        "blocks.1.norm1.weight",
        "blocks_1/norm1/scale",
        "unexpected",
        "blocks.0.attn.extra.weight",
        "shape mismatches",
        "head.weight (7, 32)",
    ):
        assert part in text, (part, text)


def test_wrong_channel_count(tiny_sd) -> None:
    gray = numpy_sd(timm_model("deit_test_distilled_patch4_32", in_chans=1))
    with pytest.raises(ValueError, match=r"1 input channels, the model expects in_chans=3"):
        convert.from_torch(gray, create_model("deit_test_distilled_patch4_32"))
    params = convert.from_torch(gray, create_model("deit_test_distilled_patch4_32", in_chans=1))
    assert params["patch_embed"]["proj"]["kernel"].shape == (4, 4, 1, 32)


def test_drop_heads_for_another_class_count(tiny_sd) -> None:
    with pytest.raises(ValueError, match="cls_head"):
        convert.from_torch(tiny_sd, create_model("deit_test_distilled_patch4_32", num_classes=7))
    model = create_model("deit_test_distilled_patch4_32", num_classes=7)
    params = convert.from_torch(tiny_sd, model, drop_heads=True, rng=3)
    fresh = init_params(model, 3)
    kept = convert.from_torch(tiny_sd, create_model("deit_test_distilled_patch4_32"))
    for head in ("cls_head", "dist_head"):
        assert params[head]["kernel"].shape == (32, 7)
        np.testing.assert_array_equal(params[head]["kernel"], fresh[head]["kernel"])
    np.testing.assert_array_equal(
        params["blocks_1"]["mlp"]["fc2"]["kernel"], kept["blocks_1"]["mlp"]["fc2"]["kernel"]
    )


def test_pos_embed_resampled_to_a_larger_grid(tiny_sd) -> None:
    model = create_model("deit_test_distilled_patch4_32", img_size=48)
    params = convert.from_torch(tiny_sd, model)
    pos, old = np.asarray(params["pos_embed"]), tiny_sd["pos_embed"]
    assert pos.shape == (1, 2 + 12 * 12, 32)
    np.testing.assert_array_equal(pos[:, :2], old[:, :2])
    np.testing.assert_array_equal(pos, np.asarray(resample_pos_embed(old, (12, 12), 2)))
    from timm.layers import resample_abs_pos_embed

    theirs = resample_abs_pos_embed(torch.from_numpy(old), (12, 12), num_prefix_tokens=2).numpy()
    assert np.abs(pos - theirs).max() < 1e-5
    _, xj = images(48)
    assert np.isfinite(flax_heads(model, params, xj)["avg"]).all()


def test_layout_detection_and_variant_inference(tiny_sd) -> None:
    assert convert.detect_layout(tiny_sd) == "timm"
    hf = numpy_sd(hf_model("DeiTForImageClassificationWithTeacher", HF_TINY))
    assert convert.detect_layout(hf) == "hf"
    assert set(convert.hf_to_timm(hf)) == set(tiny_sd)
    ti = numpy_sd(timm_model("deit_tiny_patch16_224"))
    assert convert.infer_variant(convert._architecture(ti)) == "deit_tiny_patch16_224"
    with pytest.raises(ValueError, match="no registered variant"):
        convert.infer_variant(convert._architecture({**tiny_sd, "cls_token": np.zeros((1, 1, 5))}))


# ----------------------------------------------------------------------------- end to end


def test_convert_checkpoint_round_trip(tmp_path) -> None:
    ref = timm_model("deit_tiny_distilled_patch16_224", seed=2)
    src = tmp_path / "deit_tiny_distilled_patch16_224-random.pth"
    torch.save({"model": ref.state_dict()}, src)
    out = convert.convert_checkpoint(src, None, tmp_path / "flax")
    model, variables, config = export.load_model(out)
    assert config["variant"] == "deit_tiny_distilled_patch16_224"
    assert config["source"] == str(src)
    xt, xj = images(224, seed=3)
    want = timm_heads(ref, xt)
    assert_parity(
        "convert_checkpoint Ti-distilled", flax_heads(model, variables["params"], xj), want
    )

    back = convert.convert_checkpoint(out, None, tmp_path / "timm", to="timm")
    assert back == tmp_path / "timm" / "model.safetensors"
    from safetensors.torch import load_file

    fresh = timm_model("deit_tiny_distilled_patch16_224", seed=9)
    fresh.load_state_dict(load_file(str(back)), strict=True)
    again = timm_heads(fresh, xt)
    assert all(np.array_equal(again[k], want[k]) for k in want)


def test_convert_hf_single_head_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    ref = hf_model("DeiTForImageClassification", HF_TINY)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    out = convert.convert_checkpoint(tmp_path / "model.safetensors", None, tmp_path / "flax")
    model, variables, config = export.load_model(out)
    assert config["variant"] == "deit_test_distilled_patch4_32" and not model.with_dist_head
    xt, xj = images(32)
    with torch.no_grad():
        logits = ref(pixel_values=xt).logits.numpy()
    ours = flax_heads(model, variables["params"], xj)
    assert np.abs(ours["cls"] - logits).max() <= TOL
