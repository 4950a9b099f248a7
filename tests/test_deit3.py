"""DeiT III (official `models_v2.py`, timm's `deit3_*`): logits against live timm for every
variant, the official `gamma_1`/`gamma_2` layout, the uniform stochastic depth, fine-tuning at
another size and class count, CLS attention maps, the Hub weights by name, and distillation into
a DeiT III refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_convert import images, numpy_sd, perturb

import deit
from deit import cli, convert, export, pretrained, run
from deit.configs import LossConfig, ModelConfig, TrainConfig
from deit.errors import InputError
from deit.model import DeiT, adapt_params, drop_path_rates, forward_with_attention, param_count
from deit.variants import DEIT3_VARIANTS
from deit.visualize import attention_maps

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

TINY = "deit3_test_patch4_32"
TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_TIMM["num_classes"] = 10
BIG = ("large", "huge")  # slow
BIG_DEPTH = 2
TOL = 1e-5


def timm_deit3(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's `name` with random weights; the tiny variant is timm's DeiT III at the tiny size.

    Every tensor gets N(0, 0.02²) added (`perturb`) and the LayerScale gammas are drawn in
    U(0.5, 1.5): at timm's 1e-6 the blocks would barely touch the tokens, and a wrong block
    would go unseen in the logits."""
    torch.manual_seed(seed)
    arch = "deit3_small_patch16_224" if name == TINY else name
    extra = TINY_TIMM if name == TINY else {}
    model = perturb(timm.create_model(arch, pretrained=False, **{**extra, **kwargs}), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


def logits(model: DeiT, params: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, x).cls_logits)


def _case(name: str):
    marks = [pytest.mark.slow] if any(b in name for b in BIG) else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_case(n) for n in DEIT3_VARIANTS])
def test_logits_equal_timms(name):
    """One image per variant, fp32: our logits within 1e-5 of timm's (`pretrained=False`,
    random weights converted). The torch model is freed before ours runs. Large and huge run
    at their full width, patch and size with `BIG_DEPTH` of their blocks (the blocks repeat;
    all 24-32 of them cost minutes on one core); their whole architecture is checked against
    timm's full model built on torch's meta device: blocks, tensors and parameters counted."""
    big = any(b in name for b in BIG)
    depth = {"depth": BIG_DEPTH} if big else {}
    ref = timm_deit3(name, **depth)
    size = ref.patch_embed.img_size[0]
    xt, xj = images(size, batch=1)
    with torch.no_grad():
        want = ref(xt).numpy()
    model = deit.create_model(name, **depth)
    params = convert.from_torch({k: v.numpy() for k, v in ref.state_dict().items()}, model)
    del ref
    got = logits(model, params, xj)
    assert got.shape == want.shape == (1, model.num_classes)
    delta = float(np.abs(got - want).max())
    print(f"\nPARITY {name}: max |Δ logit| {delta:.2e} (logits up to {np.abs(want).max():.2f})")
    assert delta <= TOL
    if big:
        with torch.device("meta"):
            full = timm.create_model(name, pretrained=False)
        ours = deit.create_model(name)
        shapes = jax.tree.leaves(jax.eval_shape(lambda: deit.init_params(ours)))
        assert len(full.blocks) == ours.depth
        assert len(shapes) == len(full.state_dict())
        assert param_count(shapes) == sum(p.numel() for p in full.parameters())


def test_architecture_and_both_layouts(tmp_path):
    """LayerScale per branch, the position embedding over the patches only, one token and one
    head; timm's keys both ways (a strict `load_state_dict` into timm), and the official
    `deit_3_*.pth` layout (`{'model': ...}` with `gamma_1`/`gamma_2`) converted by file with
    its variant inferred."""
    model = deit.create_model(TINY)
    params = deit.init_params(model)
    assert params["pos_embed"].shape == (1, 64, 32) and "dist_token" not in params
    np.testing.assert_array_equal(params["blocks_1"]["ls2"]["gamma"], np.full(32, 1e-6, np.float32))
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1"} | {
        "norm",
        "cls_head",
    }
    ref = timm_deit3(TINY)
    xt, xj = images(32, batch=2)
    with torch.no_grad():
        want = ref(xt).numpy()
    params = convert.from_torch(numpy_sd(ref), model)
    np.testing.assert_allclose(logits(model, params, xj), want, rtol=0, atol=TOL)
    back = convert.to_torch(params, model)
    fresh = timm_deit3(TINY, seed=9)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(xt).numpy(), want, rtol=0, atol=TOL)
    # The official layout: same tensors, LayerScale as `blocks.{i}.gamma_{1,2}`.
    official = {
        k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
        for k, v in ref.state_dict().items()
    }
    assert "blocks.0.gamma_1" in official and not any(".ls1." in k for k in official)
    torch.save({"model": official}, tmp_path / "deit_3_test_32_1k.pth")
    folder = convert.convert_checkpoint(tmp_path / "deit_3_test_32_1k.pth", None, tmp_path / "o")
    loaded, variables, config = export.load_exported(folder)
    assert config["variant"] == TINY and loaded.no_embed_class and loaded.init_values == 1e-6
    np.testing.assert_allclose(logits(loaded, variables["params"], xj), want, rtol=0, atol=TOL)
    # A DeiT III file into a DeiT (and back) names the keys that do not fit.
    with pytest.raises(InputError, match=r"ls1\.gamma"):
        convert.from_torch(numpy_sd(ref), deit.create_model("deit_test_patch4_32"))


def test_stochastic_depth_schedules():
    """linear: 0 at the first block (DeiT); uniform: every block at the rate (DeiT III). A
    one-block model at rate 0.5 drops nothing under linear and does under uniform."""
    assert drop_path_rates(0.2, 3) == pytest.approx([0.0, 0.1, 0.2])
    assert drop_path_rates(0.2, 3, "uniform") == [0.2, 0.2, 0.2]
    with pytest.raises(InputError, match="drop_path_schedule 'cosine'"):
        deit.create_model(TINY, drop_path_schedule="cosine")
    base = deit.create_model(TINY, depth=1, drop_path_rate=0.5)
    params = deit.init_params(base)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # LayerScale away from 1e-6
    x = images(32, batch=8)[1]
    keys = {"dropout": jax.random.PRNGKey(0)}
    plain = base.apply({"params": params}, x).cls_logits
    linear = base.apply({"params": params}, x, train=True, rngs=keys).cls_logits
    uniform = base.clone(drop_path_schedule="uniform")
    dropped = uniform.apply({"params": params}, x, train=True, rngs=keys).cls_logits
    np.testing.assert_allclose(linear, plain, atol=1e-5)
    assert not np.allclose(dropped, plain, atol=1e-3)
    assert ModelConfig(drop_path_schedule="uniform").drop_path_schedule == "uniform"


def test_finetune_grid_and_classes_as_timm_resamples():
    """Another image size and class count: the patch-only position embedding resampled as
    timm's `resample_abs_pos_embed(num_prefix_tokens=0)` does, fresh heads, and the body's
    logits then equal timm's model at that size."""
    from timm.layers import resample_abs_pos_embed

    src = deit.create_model(TINY)
    ref = timm_deit3(TINY)
    params = convert.from_torch(numpy_sd(ref), src)
    dst = src.clone(img_size=48, num_classes=5)
    tuned = adapt_params(params, src, dst, rng=1)
    pos = resample_abs_pos_embed(ref.pos_embed.detach(), (12, 12), num_prefix_tokens=0)
    assert tuned["pos_embed"].shape == (1, 144, 32)
    np.testing.assert_allclose(tuned["pos_embed"], pos.numpy(), rtol=0, atol=1e-5)
    assert tuned["cls_head"]["kernel"].shape == (32, 5)
    big = timm_deit3(TINY, img_size=48, num_classes=5)
    big.load_state_dict({k: torch.from_numpy(v) for k, v in convert.to_torch(tuned, dst).items()})
    xt, xj = images(48, batch=1)
    with torch.no_grad():
        want = big(xt).numpy()
    np.testing.assert_allclose(logits(dst, tuned, xj), want, rtol=0, atol=TOL)


def test_cls_attention_maps():
    """One prefix token: the attention is `(B, heads, 1 + N, 1 + N)` and the maps are the
    class token's only, over the 8x8 patch grid."""
    model = deit.create_model(TINY)
    params = deit.init_params(model)
    _, attn, tokens = forward_with_attention(model, {"params": params}, images(32, batch=2)[1])
    assert attn[-1].shape == (2, 2, 65, 65) and tokens[-1].shape == (2, 65, 32)
    np.testing.assert_allclose(np.asarray(attn[0]).sum(-1), 1.0, atol=1e-5)
    maps = attention_maps(attn, model.grid, model.num_prefix_tokens)
    assert set(maps) == {"cls_last", "cls_rollout"} and maps["cls_last"].shape == (2, 8, 8)


@pytest.mark.slow
def test_finetune_and_visualize_end_to_end(tmp_path, capsys):
    """`deit train --finetune` a DeiT III folder at 16x16 on 3 classes, then `deit visualize`
    on the result: the run's model keeps LayerScale and the patch-only embedding."""
    from PIL import Image
    from test_finetune import _image_folder

    src = deit.create_model(TINY)
    export.save_model(tmp_path / "ckpt", src, {"params": deit.init_params(src)}, variant=TINY)
    _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = ["train", "--finetune", str(tmp_path / "ckpt"), "--data", str(tmp_path / "images")]
    args += ["--img-size", "16", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    args += ["--distillation", "none", "--output", str(out)]
    assert cli.main(args) == 0
    model, tuned, _ = export.load_model(out / "final")
    assert (model.num_classes, model.img_size, model.init_values) == (3, 16, 1e-6)
    assert tuned["params"]["pos_embed"].shape == (1, 16, 32)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    viz = ["visualize", "--checkpoint", str(out), str(tmp_path / "x.png")]
    assert cli.main([*viz, "--out", str(tmp_path / "viz")]) == 0
    assert (tmp_path / "viz" / "x_attention.png").is_file()
    assert not (tmp_path / "viz" / "token_similarity.png").exists()


def test_distillation_into_a_deit3_is_refused(tmp_path, capsys):
    cfg = TrainConfig(model=ModelConfig(name=TINY), loss=LossConfig(distillation="soft"))
    with pytest.raises(InputError, match="has no distillation token"):
        run.check_student(cfg, None)
    run.check_student(TrainConfig(model=ModelConfig(name=TINY), loss=LossConfig()), None)
    run.check_student(TrainConfig(model=ModelConfig(name="deit_test_patch4_32")), None)
    args = ["train", "--model", TINY, "--distillation", "hard", "--output", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DeiT III student has no distillation token" in err
    assert not (tmp_path / "o").exists()


def test_the_registry_holds_the_hub_weights():
    """Sixteen DeiT III entries (1k and 21k -> 1k), each from the Hub's timm layout (the
    official files carry no hash to check), with timm's eval crop; the official top-1."""
    entries = pretrained.DEIT3_PRETRAINED
    assert len(entries) == 16 and all(n in pretrained.PRETRAINED for n in entries)
    for name, w in entries.items():
        assert w.variant in DEIT3_VARIANTS and not w.pinned and w.default_source == "timm"
        tag = "fb_in22k_ft_in1k" if name.endswith(".fb_in22k_ft_in1k") else "fb_in1k"
        assert w.timm_repo == f"timm/{w.variant}.{tag}"
        cfg = timm.models.get_pretrained_cfg(f"{w.variant}.{tag}")
        crop = w.crop_pct or deit.get_spec(w.variant).crop_pct
        assert (crop, deit.get_spec(w.variant).interpolation) == (
            cfg.crop_pct,
            cfg.interpolation,
        )
        assert cfg.url.endswith(w.file)
    assert entries["deit3_base_patch16_224"].top1 == 83.8
    assert entries["deit3_base_patch16_224.fb_in22k_ft_in1k"].top1 == 85.7
    with pytest.raises(InputError, match="carries no hash"):
        pretrained.checkpoint_file("deit3_small_patch16_224", "official")
    with pytest.raises(InputError, match="no Hugging Face transformers layout"):
        pretrained.checkpoint_file("deit3_small_patch16_224", "hf")


HUB_SCRIPT = """
import sys
import numpy as np
import jax
from deit import export, pretrained

name, out = sys.argv[1:]
variant, _, tag = name.partition(".")
pretrained.PRETRAINED[name] = pretrained.Weights(
    name, "deit_3_test_32_21k.pth", 0, None, hub_tag=tag, crop_pct=1.0
)
model, variables = pretrained.load_pretrained(name)
folder = pretrained.pretrained_folder(name)
config = export.load_model(folder)[2]
x = np.load(out + ".in.npy")
np.save(out, jax.jit(model.apply)(variables, x).cls_logits)
print(folder, config["crop_pct"], config["variant"])
"""


def test_weights_by_name_from_a_fake_hub(server, deit_home, tmp_path):
    """A tagged name (`VARIANT.fb_in22k_ft_in1k`) through `huggingface_hub` against a loopback
    Hub: downloaded, converted with its own crop (1.0), logits equal timm's."""
    name = f"{TINY}.fb_in22k_ft_in1k"
    ref = timm_deit3(TINY, seed=4)
    from safetensors.numpy import save as save_safetensors

    server.files[f"/timm/{name}/resolve/main/model.safetensors"] = save_safetensors(numpy_sd(ref))
    xt, xj = images(32, batch=1)
    with torch.no_grad():
        want = ref(xt).numpy()
    out = str(tmp_path / "logits")
    np.save(out + ".in.npy", xj)
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
    env["HF_HUB_DISABLE_XET"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, name, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    folder, crop, variant = done.stdout.split()
    assert (float(crop), variant) == (1.0, TINY) and folder.endswith(f"{name}/timm")
    np.testing.assert_allclose(np.load(out + ".npy"), want, rtol=0, atol=TOL)
    assert json.loads((deit_home / "pretrained" / name / "timm" / "config.json").read_text())


@pytest.fixture
def server():
    import http.server
    import threading

    from test_pretrained import _Handler  # the loopback Hub of the DeiT weight tests

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut, httpd.requests = {}, set(), []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_deit_is_unchanged():
    """The DeiT variants build no LayerScale and keep the prefix rows in `pos_embed`."""
    params = convert.expected_shapes(deit.create_model("deit_test_distilled_patch4_32"))
    assert params["pos_embed"].shape == (1, 66, 32) and params["dist_token"].shape == (1, 1, 32)
    assert not any("/ls" in name for name in params)
