"""deit.features against live timm: `forward_features`, `forward_head` (pre-logits and logits)
and `forward_intermediates` (indices, norm, formats, prefix tokens) of a tiny perturbed timm
DeiT converted with `convert.from_torch`, at the model's size and at another one
(`dynamic_img_size`); and the one-line errors for bad indices and formats."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from deit import convert
from deit.features import (
    forward_features,
    forward_head,
    forward_intermediates,
    pre_logits,
    take_indices,
)
from deit.model import DeiT, init_params

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TOL = 1e-5
DEPTH = 3
SIZES = [(32, 32), (24, 40)]  # the model's own grid, and another one (resampled pos_embed)


def _pair(distilled: bool) -> tuple[torch.nn.Module, DeiT, dict]:
    """timm's model (perturbed so every tensor carries signal) and ours with its weights."""
    torch.manual_seed(0)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    ref = cls(
        num_classes=10,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        mlp_ratio=2.0,
        dynamic_img_size=True,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    model = DeiT(
        num_classes=10,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        mlp_dim=64,
        distilled=distilled,
        dynamic_img_size=True,
    )
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return ref, model, {"params": convert.from_torch(sd, model)}


@pytest.fixture(scope="module")
def pairs():
    return {True: _pair(True), False: _pair(False)}


def _images(hw: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(2, 3, *hw)).astype(np.float32)
    return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def _close(ours, ref) -> None:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert np.asarray(ours).shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "plain"])
def test_features_pre_logits_and_head_match_timm(pairs, distilled, hw):
    ref, model, variables = pairs[distilled]
    xt, xj = _images(hw)
    with torch.no_grad():
        tokens = ref.forward_features(xt)
        want_pre, want_logits = ref.forward_head(tokens, pre_logits=True), ref(xt)
    got = forward_features(model, variables, xj)
    _close(got, tokens)
    _close(forward_head(model, variables, got, pre_logits=True), want_pre)
    _close(pre_logits(model, variables, xj), want_pre)
    _close(forward_head(model, variables, got), want_logits)
    # One image without the batch axis: the same rows.
    _close(forward_features(model, variables, xj[0]), tokens[0])


@pytest.mark.parametrize(
    ("distilled", "indices", "norm", "fmt", "prefix", "only"),
    [
        (True, None, False, "NCHW", False, False),
        (True, 2, True, "NCHW", True, False),
        (True, [0, -1], True, "NHWC", False, True),
        (False, (1,), False, "NLC", True, True),
        (False, [-2, 2], True, "NCHW", True, False),
    ],
)
def test_forward_intermediates_match_timm(pairs, distilled, indices, norm, fmt, prefix, only):
    ref, model, variables = pairs[distilled]
    xt, xj = _images((24, 40))
    with torch.no_grad():
        want = ref.forward_intermediates(
            xt,
            indices=list(indices) if isinstance(indices, tuple) else indices,
            norm=norm,
            output_fmt="NLC" if fmt == "NLC" else "NCHW",
            return_prefix_tokens=prefix,
            intermediates_only=only,
        )
    got = forward_intermediates(
        model,
        variables,
        xj,
        indices,
        norm=norm,
        output_fmt=fmt,
        return_prefix_tokens=prefix,
        intermediates_only=only,
    )
    if not only:
        _close(got[0], want[0])
        got, want = got[1], want[1]
    count = DEPTH if indices is None else indices if isinstance(indices, int) else len(indices)
    assert len(got) == len(want) == count
    for g, w in zip(got, want, strict=True):
        if prefix:
            _close(g[1], w[1])
            assert g[1].shape[1] == model.num_prefix_tokens
            g, w = g[0], w[0]
        if fmt == "NHWC":  # timm has NCHW only; ours is its transpose
            w = w.permute(0, 2, 3, 1)
        _close(g, w)
    if fmt != "NLC":
        spatial = got[0][0] if prefix else got[0]
        assert spatial.shape[1:3] == ((24 // 4, 40 // 4) if fmt == "NHWC" else (32, 24 // 4))


def test_intermediates_under_jit_equal_eager(pairs):
    _, model, variables = pairs[True]
    _, xj = _images((32, 32))
    run = jax.jit(lambda v, x: forward_intermediates(model, v, x, [-1], intermediates_only=True))
    np.testing.assert_allclose(
        run(variables, xj)[0],
        forward_intermediates(model, variables, xj, [-1], intermediates_only=True)[0],
        atol=1e-6,
    )


def test_take_indices_follow_timm_and_name_bad_ones():
    assert take_indices(4, None) == (0, 1, 2, 3)
    assert take_indices(4, 2) == (2, 3)
    assert take_indices(4, [0, -1, -4]) == (0, 3, 0)
    with pytest.raises(ValueError, match=r"^block index 4 is out of range; expected -4 to 3"):
        take_indices(4, [0, 4])
    with pytest.raises(ValueError, match=r"^block index -5 is out of range"):
        take_indices(4, [-5])
    with pytest.raises(ValueError, match=r"^indices 5: the last-n count .* expected 1 to 4"):
        take_indices(4, 5)
    with pytest.raises(ValueError, match="indices 0"):
        take_indices(4, 0)
    with pytest.raises(ValueError, match="indices is empty"):
        take_indices(4, [])


def test_bad_format_and_headless_logits_are_one_line_errors():
    model = DeiT(num_classes=0, img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    variables = {"params": init_params(model)}
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"output_fmt 'NWHC'; expected one of"):
        forward_intermediates(model, variables, x, output_fmt="NWHC")
    with pytest.raises(ValueError, match=r"block index 1 is out of range; expected -1 to 0"):
        forward_intermediates(model, variables, x, [1])
    with pytest.raises(ValueError) as bad_size:
        forward_features(model.clone(dynamic_img_size=True), variables, np.zeros((1, 6, 8, 3)))
    assert str(bad_size.value) == (
        "image is 6x8, not divisible by patch_size 4; expected sides that are multiples of 4"
    )
    tokens = forward_features(model, variables, x)
    assert tokens.shape == (1, 2 + 4, 8)
    with pytest.raises(ValueError, match="no heads"):
        forward_head(model, variables, tokens)
    # Headless distilled model: pre-logits are the mean of CLS and DIST, as timm's.
    np.testing.assert_allclose(
        forward_head(model, variables, tokens, pre_logits=True),
        (tokens[:, 0] + tokens[:, 1]) / 2,
        atol=1e-7,
    )
