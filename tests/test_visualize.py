import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import deit
from deit import cli, export
from deit.model import forward_with_attention
from deit.visualize import attention_maps, attention_rollout, token_similarity


@pytest.fixture(scope="module")
def tiny():
    model = deit.create_model("deit_test_distilled_patch4_32")
    params = deit.init_params(model, 0)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    return model, {"params": params}, x


def assert_drawn(path) -> None:
    """A PNG of a real figure: it decodes, is figure-sized, and is not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 100, (path, img.size)
        pixels = np.asarray(img.convert("L"), np.float32)
    assert pixels.std() > 5, f"{path} is blank"


def test_capture_returns_attention_and_tokens_without_changing_outputs(tiny):
    model, variables, x = tiny
    plain = model.apply(variables, x)
    out, attn, tokens = forward_with_attention(model, variables, x)
    np.testing.assert_allclose(out.cls_logits, plain.cls_logits, atol=1e-6)
    np.testing.assert_allclose(out.dist_logits, plain.dist_logits, atol=1e-6)
    t = 2 + 8 * 8  # cls, dist and the 8x8 patch grid
    assert len(attn) == len(tokens) == model.depth
    assert all(a.shape == (3, model.num_heads, t, t) for a in attn)
    assert all(tok.shape == (3, t, model.embed_dim) for tok in tokens)
    # Softmax over the keys: every query's row sums to 1.
    for a in attn:
        np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)
    # The last block's tokens are what the final norm and the heads read.
    p = variables["params"]
    last = np.asarray(tokens[-1], np.float64)
    normed = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
    normed = normed * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    cls = normed[:, 0] @ np.asarray(p["cls_head"]["kernel"]) + np.asarray(p["cls_head"]["bias"])
    np.testing.assert_allclose(cls, plain.cls_logits, atol=1e-4)
    # The plain module never sows: applying it with a mutable collection leaves it empty.
    _, state = model.apply(variables, x, mutable=["intermediates"])
    assert not state.get("intermediates")


def test_single_image_has_no_batch_axis(tiny):
    model, variables, x = tiny
    out, attn, tokens = forward_with_attention(model, variables, x[0])
    assert out.cls_logits.shape == (10,)
    assert attn[0].shape == (2, 66, 66) and tokens[0].shape == (66, 32)


def test_rollout_by_hand():
    rng = np.random.default_rng(0)
    attn = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]  # (B, H, T, T)
    rollout = attention_rollout(attn)
    assert rollout.shape == (2, 5, 5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-6)
    mixed = [(a.mean(1) + np.eye(5)) / 2 for a in attn]  # rows of A + I sum to 2
    np.testing.assert_allclose(rollout, mixed[2] @ mixed[1] @ mixed[0], atol=1e-6)
    # Attention to oneself only: the residual changes nothing, the rollout is the identity.
    eye = [np.broadcast_to(np.eye(4), (1, 2, 4, 4))] * 2
    np.testing.assert_allclose(attention_rollout(eye), np.eye(4)[None], atol=1e-7)


def test_maps_of_distilled_and_plain_models(tiny):
    model, variables, x = tiny
    _, attn, _ = forward_with_attention(model, variables, x)
    maps = attention_maps(attn, model.grid, 2)
    assert set(maps) == {"cls_last", "dist_last", "cls_rollout", "dist_rollout"}
    assert all(m.shape == (3, 8, 8) for m in maps.values())
    # The class token's last-layer row over the patches: head mean, prefix columns dropped.
    want = np.asarray(attn[-1]).mean(1)[:, 0, 2:].reshape(3, 8, 8)
    np.testing.assert_allclose(maps["cls_last"], want, atol=1e-6)
    plain = deit.create_model("deit_test_patch4_32")
    _, attn, _ = forward_with_attention(plain, {"params": deit.init_params(plain, 0)}, x)
    assert set(attention_maps(attn, plain.grid, 1)) == {"cls_last", "cls_rollout"}


def test_token_similarity(tiny):
    model, variables, x = tiny
    _, _, tokens = forward_with_attention(model, variables, x)
    params = dict(variables["params"])
    sim = token_similarity(params, tokens)
    assert len(sim["layers"]) == model.depth
    assert all(-1 <= v <= 1 for v in [sim["input"], *sim["layers"], sim["output"], sim["heads"]])
    # Identical tokens and identical heads are maximally similar.
    params["dist_token"] = params["cls_token"]
    params["dist_head"] = params["cls_head"]
    same = token_similarity(params, [np.stack([tokens[0][:, 0]] * 2, axis=1)])
    assert same["input"] == pytest.approx(1.0) and same["heads"] == pytest.approx(1.0)
    assert same["layers"] == [pytest.approx(1.0)] and same["output"] == pytest.approx(1.0)


def _export_tiny(folder, name):
    model = deit.create_model(name)
    variables = {"params": deit.init_params(model, 1)}
    classes = [f"c{i}" for i in range(10)]
    mean, std = [0.5] * 3, [0.25] * 3
    export.save_model(
        folder, model, variables, classes=classes, mean=mean, std=std, img_size=32, crop_pct=1.0
    )


def _images(tmp_path, n=2):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_visualize_checkpoint_writes_pngs(tmp_path, capsys):
    _export_tiny(tmp_path / "model", "deit_test_distilled_patch4_32")
    images = _images(tmp_path)
    out = tmp_path / "pics"
    assert (
        cli.main(["visualize", "--checkpoint", str(tmp_path / "model"), *images, "--out", str(out)])
        == 0
    )
    for name in ("img0_attention.png", "img1_attention.png", "token_similarity.png"):
        assert_drawn(out / name)
    assert capsys.readouterr().out.count("wrote") == 3
    sim = json.loads((out / "token_similarity.json").read_text())
    assert len(sim["layers"]) == 2
    # --together: one figure, a row per image.
    args = ["visualize", "--checkpoint", str(tmp_path / "model"), "--together", *images]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_drawn(tmp_path / "one" / "attention.png")
    # A plain model: class-token maps only, no token-similarity plot.
    _export_tiny(tmp_path / "plain", "deit_test_patch4_32")
    plain_out = tmp_path / "plain_pics"
    assert (
        cli.main(
            [
                "visualize",
                "--checkpoint",
                str(tmp_path / "plain"),
                images[0],
                "--out",
                str(plain_out),
            ]
        )
        == 0
    )
    assert [p.name for p in plain_out.iterdir()] == ["img0_attention.png"]


def test_visualize_run_writes_curves_and_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    head = {"top1": 90.0, "top5": 99.0, "loss": 0.3, "count": 10}
    val = {"cls": head, "dist": head, "avg": head}
    lines = [
        {
            "kind": "train",
            "step": s,
            "epoch": 0,
            "loss": 1.0 / s,
            "base_loss": 1.0 / s,
            "kd_loss": 0.5 / s,
            "lr": 1e-3,
        }
        for s in (1, 2)
    ]
    lines.append({"kind": "eval", "step": 2, "epoch": 0, "val": val})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    summary = {"model": "m", "distillation": "hard", "val": val, "teacher": head}
    (run / "results.json").write_text(json.dumps(summary))
    assert cli.main(["visualize", "--run", str(run), "--out", str(tmp_path / "o")]) == 0
    assert_drawn(tmp_path / "o" / "curves.png")
    assert_drawn(tmp_path / "o" / "results.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["visualize"], "nothing to draw"),
        (["visualize", "--run", "/nonexistent"], "has no metrics.jsonl"),
        (["visualize", "x.png"], "image files need --checkpoint"),
        (["visualize", "--checkpoint", "/nonexistent", "x.png"], "holds no exported model"),
    ],
)
def test_visualize_errors_are_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_rollout_needs_a_layer():
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])


def test_plotting_leaves_matplotlib_global_state_alone(tmp_path):
    """No `matplotlib.use` and no pyplot: a caller's backend (here svg) survives importing the
    module and drawing with it, and no figure is left in pyplot's list."""
    code = (
        "import sys, matplotlib\n"
        "before = (matplotlib.get_backend(), matplotlib.rcParams['backend'])\n"
        "import deit.visualize as v\n"
        "sim = {'input': 0.1, 'layers': [0.2, 0.5], 'output': 0.9, 'heads': None}\n"
        f"v.plot_token_similarity({{'m': sim}}, {str(tmp_path / 'sim.png')!r})\n"
        "after = (matplotlib.get_backend(), matplotlib.rcParams['backend'])\n"
        "assert before == after == ('svg', 'svg'), (before, after)\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
