"""RegNetY teachers (the paper's RegNetY-16GF and its family): the generator against timm's, logits
against live timm (random weights, tiny and full widths), conversion both ways, teachers by name /
URL / file through the cache (a loopback server), fine-tune-then-distil on generated data, and the
one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save as save_safetensors
from test_bad_input import make_folder, one_line_error
from test_pretrained import _pth, server  # noqa: F401 -- the loopback server fixture
from timm.models.regnet import RegNet as TimmRegNet
from timm.models.regnet import RegNetCfg as TimmCfg

import deit
from deit import cli, export, pretrained, regnet, teacher_source
from deit import regnet_convert as rc
from deit.errors import InputError
from deit.teacher import create_teacher

TINY = "regnety_test"


def timm_regnet(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """timm's RegNet for `regnet.REGNETS[name]`, in eval mode, with BatchNorm weights and running
    statistics drawn at random (timm's init leaves them at 1/0 and zeroes each block's last BN,
    which would hide a misplaced tensor)."""
    c = regnet.REGNETS[name]
    torch.manual_seed(seed)
    model = TimmRegNet(_timm_cfg(c), num_classes=num_classes).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_mean") or (".bn." in key and key.endswith("bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
            elif key.endswith("running_var") or (".bn." in key and key.endswith("weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
    return model


def _timm_cfg(c: regnet.RegNetCfg) -> TimmCfg:
    fields = ("w0", "wa", "wm", "depth", "group_size", "se_ratio", "bottle_ratio", "stem_width")
    return TimmCfg(**{f: getattr(c, f) for f in fields})


def numpy_sd(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nhwc_nchw(size: int, batch: int = 2, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def timm_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


# ----------------------------------------------------------------------------- the network


@pytest.mark.parametrize("name", sorted(regnet.REGNETS))
def test_the_generator_gives_timms_stages(name):
    # timm's own stage arguments (widths after its width/group adjustment, depths, groups).
    stages, _ = TimmRegNet._get_stage_args(None, _timm_cfg(regnet.REGNETS[name]))
    layout = regnet.stage_layout(regnet.REGNETS[name])
    assert layout.widths == tuple(s["out_chs"] for s in stages)
    assert layout.depths == tuple(s["depth"] for s in stages)
    assert layout.group_sizes == tuple(s["group_size"] for s in stages)


def test_regnety_160_is_the_papers_teacher():
    model = create_teacher("regnety_160", 1000)
    assert model.widths == (224, 448, 1232, 3024) and model.depths == (2, 4, 11, 1)
    assert set(model.group_sizes) == {112} and model.se_ratio == 0.25 and model.stem_width == 32
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert set(variables) == {"params", "batch_stats"}
    # 83,590,140 parameters: timm's count for regnety_160 (BN running statistics are buffers).
    assert deit.param_count(variables["params"]) == 83_590_140
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


def test_tiny_logits_match_timm_and_batch_stats_update():
    ref = timm_regnet(TINY)
    model = rc.infer_regnet(numpy_sd(ref))
    assert model == create_teacher(TINY, 10)
    variables = rc.from_torch(numpy_sd(ref), model)
    x, xt = nhwc_nchw(64)
    got = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(got), timm_logits(ref, xt), rtol=0, atol=1e-4)
    # bfloat16 compute: float32 logits, close to the float32 ones.
    bf16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(got), rtol=0, atol=0.05)
    # Train mode: batch statistics, and the running ones move as torch's momentum 0.1 does.
    ref.train()
    with torch.no_grad():
        want = ref(xt).numpy()
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-4)
    torch_stats = export.flatten(rc.from_torch(numpy_sd(ref), model)["batch_stats"])
    ours = export.flatten(updates["batch_stats"])
    assert set(ours) == set(torch_stats)
    for path, value in ours.items():
        # torch's running_var takes the unbiased batch variance (n / (n - 1)), Flax the biased.
        tol = dict(rtol=0.05, atol=0) if path.endswith("var") else dict(rtol=0, atol=1e-5)
        np.testing.assert_allclose(value, torch_stats[path], **tol)


@pytest.mark.slow
def test_regnety_160_logits_match_timm():
    ref = timm_regnet("regnety_160", num_classes=1000)
    sd = numpy_sd(ref)
    model = rc.infer_regnet(sd)
    assert model == create_teacher("regnety_160", 1000)
    variables = rc.from_torch(sd, model)
    x, xt = nhwc_nchw(64)
    got = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(got), timm_logits(ref, xt), rtol=0, atol=1e-4)
    back = rc.to_torch(variables, model)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd if "num_batches" not in k)


# ----------------------------------------------------------------------------- conversion


def test_round_trip_through_files_and_the_cli(tmp_path, capsys):
    ref = timm_regnet(TINY, num_classes=1000, seed=1)
    src = tmp_path / "regnety_test-00000000.pth"
    src.write_bytes(_pth(ref.state_dict()))
    out = tmp_path / "flax"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "RegNet" and config["variant"] == TINY
    assert config["dataset"] == "imagenet-1k" and config["crop_pct"] == 0.875
    model, variables, _ = export.load_exported(out)
    x, xt = nhwc_nchw(32)
    want = timm_logits(ref, xt)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0, atol=1e-4)
    # Back to timm's layout: timm loads it strictly and gives the same logits.
    assert cli.main(["convert", str(out), "--to", "timm", "--out", str(tmp_path / "t")]) == 0
    from safetensors.torch import load_file

    again = timm_regnet(TINY, num_classes=1000, seed=9)
    again.load_state_dict(load_file(str(tmp_path / "t" / "model.safetensors")), strict=True)
    np.testing.assert_allclose(timm_logits(again, xt), want, rtol=0, atol=1e-6)
    # A safetensors file converts the same way; another class count gets a fresh head.
    st = tmp_path / "w.safetensors"
    st.write_bytes(save_safetensors(numpy_sd(ref)))
    small = tmp_path / "small"
    argv = ["convert", str(st), "--out", str(small), "--num-classes", "3", "--model", TINY]
    assert cli.main(argv) == 0
    m3, v3, c3 = export.load_exported(small)
    assert m3.num_classes == 3 and "dataset" not in c3
    np.testing.assert_array_equal(
        v3["params"]["s1"]["b1"]["conv1"]["conv"]["kernel"],
        variables["params"]["s1"]["b1"]["conv1"]["conv"]["kernel"],
    )
    capsys.readouterr()


def test_eval_and_predict_on_a_converted_teacher(tmp_path, capsys):
    ref = timm_regnet(TINY, num_classes=1000, seed=2)
    src = tmp_path / "t.pth"
    src.write_bytes(_pth(ref.state_dict()))
    out = tmp_path / "teacher"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), np.uint8)).save(image)
    assert cli.main(["predict", "--checkpoint", str(out), str(image)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(image) and len(printed) == 6 and "%" in printed[1]
    root = make_folder(tmp_path / "data", per_class=2, size=40)
    assert cli.main(["eval", "--checkpoint", str(out), "--data", str(root), "--workers", "0"]) == 0
    assert "averaged heads" not in capsys.readouterr().out  # one head: the class head only


def test_the_python_call_returns_module_and_variables(tmp_path):
    ref = timm_regnet(TINY, num_classes=1000, seed=3)
    src = tmp_path / "mine.pth"
    src.write_bytes(_pth(ref.state_dict()))
    model, variables = deit.load_teacher(str(src))
    assert isinstance(model, regnet.RegNet) and set(variables) == {"params", "batch_stats"}
    x, xt = nhwc_nchw(32)
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, x)), timm_logits(ref, xt), rtol=0, atol=1e-4
    )
    # Converted once: the second call reads the cached folder.
    folder = pretrained.file_folder(src)
    stamp = (folder / export.WEIGHTS).stat().st_mtime_ns
    again, _ = deit.load_teacher(str(src), dtype="bfloat16")
    assert again.dtype == jnp.bfloat16
    assert (folder / export.WEIGHTS).stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- by name, by URL


@pytest.fixture
def official_tiny(server, monkeypatch, deit_home):  # noqa: F811 -- the imported fixture
    """A random tiny timm RegNet served as `regnety_test-<sha256[:8]>.pth`, registered as a
    pretrained teacher (the paper's regnety_160 entry, at tiny widths)."""
    ref = timm_regnet(TINY, num_classes=1000, seed=4)
    body = _pth(ref.state_dict())
    file = f"{TINY}-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/deit/{file}"] = body
    entry = dataclasses.replace(
        pretrained.TEACHER_WEIGHTS["regnety_160"],
        name=TINY,
        file=file,
        url_base=f"{server.url}/deit/",
    )
    monkeypatch.setitem(pretrained.TEACHER_WEIGHTS, TINY, entry)
    return ref, entry


def test_the_registry_names_the_papers_teacher():
    w = pretrained.TEACHER_WEIGHTS["regnety_160"]
    assert w.url == "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"
    assert w.sha256_prefix == "a5fe301d" and w.timm_repo == "timm/regnety_160.deit_in1k"
    assert w.top1 == 82.9


def test_a_teacher_by_name_downloads_and_converts_once(official_tiny, server, deit_home):  # noqa: F811
    ref, entry = official_tiny
    model, variables = deit.load_teacher(TINY)
    x, xt = nhwc_nchw(32)
    want = timm_logits(ref, xt)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0, atol=1e-4)
    assert server.requests == [("GET", f"/deit/{entry.file}")]
    folder = deit_home / "pretrained" / TINY / "official"
    stamp = (folder / export.WEIGHTS).stat().st_mtime_ns
    deit.load_teacher(TINY)
    # Its URL (official --teacher-path) is the same cache entry: nothing fetched or converted.
    assert teacher_source.teacher_folder(entry.url, TINY) == folder
    assert len(server.requests) == 1 and (folder / export.WEIGHTS).stat().st_mtime_ns == stamp


def test_a_teacher_by_url_checks_the_hash_prefix(server, deit_home):  # noqa: F811
    ref = timm_regnet(TINY, num_classes=1000, seed=5)
    body = _pth(ref.state_dict())
    good = f"mine-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/w/{good}"] = body
    folder = teacher_source.teacher_folder(f"{server.url}/w/{good}", TINY)
    assert (folder / export.WEIGHTS).is_file() and (deit_home / "downloads" / good).is_file()
    server.files["/w/mine-deadbeef.pth"] = body
    with pytest.raises(InputError, match="not the deadbeef its name promises"):
        teacher_source.teacher_folder(f"{server.url}/w/mine-deadbeef.pth")


HUB_SCRIPT = """
import sys
import numpy as np
from deit import pretrained, teacher_source
name, file, out = sys.argv[1:]
pretrained.TEACHER_WEIGHTS[name] = pretrained.Weights(name, file, 0.0, None, hub_tag="deit_in1k")
model, variables = teacher_source.load_teacher(name + "@timm")
np.save(out, np.asarray(model.apply(variables, np.load(out + ".in.npy"))))
"""


def test_the_hub_copy_through_hf_endpoint(server, deit_home, tmp_path):  # noqa: F811
    ref = timm_regnet(TINY, num_classes=1000, seed=6)
    server.files[f"/timm/{TINY}.deit_in1k/resolve/main/model.safetensors"] = save_safetensors(
        numpy_sd(ref)
    )
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
    env["HF_HUB_DISABLE_XET"] = "1"
    out = str(tmp_path / "logits")
    x, xt = nhwc_nchw(32)
    np.save(out + ".in.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, TINY, f"{TINY}-00000000.pth", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(out + ".npy"), timm_logits(ref, xt), rtol=0, atol=1e-4)
    assert (deit_home / "pretrained" / TINY / "timm" / export.WEIGHTS).is_file()


# ----------------------------------------------------------------------------- bad input


def test_a_checkpoint_of_another_architecture_than_the_name(tmp_path, capsys):
    src = tmp_path / "other.pth"
    src.write_bytes(_pth(timm_regnet(TINY, num_classes=1000).state_dict()))
    err = one_line_error(
        capsys, ["convert", src, "--model", "regnety_160", "--out", tmp_path / "o"]
    )
    assert f"{src} holds a regnety_test (widths 8/16/32/64, depths 1/1/2/1" in err
    assert "not the regnety_160 its name asks for (widths 224/448/1232/3024, depths 2/4/11/1" in err
    root = make_folder(tmp_path / "data", per_class=4, size=32)
    argv = _train(root, tmp_path, "--teacher-model", "regnety_160", "--teacher-path", src)
    err = one_line_error(capsys, argv)
    assert "holds a regnety_test" in err and "not the regnety_160" in err
    # A DeiT checkpoint under a RegNet's name.
    from test_convert import timm_model

    deit_file = tmp_path / "deit.pth"
    deit_file.write_bytes(_pth(timm_model("deit_test_distilled_patch4_32").state_dict()))
    err = one_line_error(capsys, ["convert", deit_file, "--model", TINY, "--out", tmp_path / "d"])
    assert f"{deit_file} holds a DeiT" in err and f"not the {TINY} asked for" in err


def test_a_truncated_download_is_one_line_and_not_cached(
    official_tiny,
    server,  # noqa: F811
    deit_home,
    capsys,
):
    _, entry = official_tiny
    server.cut.add(f"/deit/{entry.file}")
    err = one_line_error(capsys, ["predict", "--pretrained", TINY, "img.png"])
    assert f"the download of {entry.url} broke off after" in err and "nothing was cached" in err
    assert list((deit_home / "downloads").iterdir()) == []


def test_an_unknown_teacher_name_lists_close_matches(tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=4, size=32)
    err = one_line_error(capsys, _train(root, tmp_path, "--teacher", "regnety_16"))
    assert "teacher 'regnety_16'" in err or "--teacher.path 'regnety_16'" in err
    assert "did you mean regnety_160, regnety_016" in err
    err = one_line_error(capsys, _train(root, tmp_path, "--teacher-model", "regnety_1600"))
    assert "did you mean regnety_160" in err


def test_another_class_count_without_fine_tuning(tmp_path, capsys):
    src = tmp_path / "t.pth"
    src.write_bytes(_pth(timm_regnet(TINY, num_classes=5).state_dict()))
    root = make_folder(tmp_path / "data", per_class=4, size=32)
    argv = _train(root, tmp_path, "--teacher", src, "--teacher.finetune", "False")
    err = one_line_error(capsys, argv)
    assert "teacher predicts 5 classes but the student has 2 (--teacher.finetune is false)" in err
    assert "expected a teacher trained on the data's classes" in err


# ----------------------------------------------------------------------------- fine-tune, distil


def _train(root, tmp_path, *extra):
    args = ["train", "--data", str(root), "--output", str(tmp_path / "run")]
    args += ["--model", "deit_test_distilled_patch4_32", "--recipe", "imagenet"]
    args += ["--img-size", "32", "--distillation", "hard", "--epochs", "1", "--workers", "0"]
    return [*args, "--batch-size", "8", "--progress", "lines", *map(str, extra)]


@pytest.mark.slow
def test_a_pretrained_teacher_is_fine_tuned_on_new_classes_then_distilled(tmp_path, capsys):
    src = tmp_path / "regnet.pth"
    src.write_bytes(_pth(timm_regnet(TINY, num_classes=1000, seed=7).state_dict()))
    root = make_folder(tmp_path / "data", classes=["a", "b", "c"], per_class=4, size=32)
    argv = _train(root, tmp_path, "--teacher", src, "--teacher.finetune-optim.epochs", "2")
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert f"{src}, fine-tuned first on the data's 3 classes for 2 epoch(s) into {run}" in err
    assert f"fine-tuned on 3 classes into {run / 'teacher' / 'final'}" in err
    assert "teacher: " in err and "% top-1 on validation after 2 epoch(s)" in err
    tuned = json.loads((run / "teacher" / "final" / "config.json").read_text())
    assert tuned["kind"] == "RegNet" and tuned["fields"]["num_classes"] == 3
    assert tuned["classes"] == ["a", "b", "c"] and tuned["finetuned_from"]
    results = json.loads((run / "results.json").read_text())
    assert results["teacher_path"] == str(run / "teacher" / "final") and "teacher" in results
    # The student's phase again (its outputs removed): the fine-tuned teacher is reused.
    for name in ("final", "best", "checkpoints", "results.json"):
        target = run / name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    assert cli.main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "reused from" in err and "fine-tuned on 3 classes into" not in err


@pytest.mark.slow
def test_a_teacher_of_the_datas_classes_is_used_as_it_is(tmp_path, capsys):
    src = tmp_path / "regnet.safetensors"
    src.write_bytes(save_safetensors(numpy_sd(timm_regnet(TINY, num_classes=2, seed=8))))
    root = make_folder(tmp_path / "data", per_class=4, size=32)
    assert cli.main(_train(root, tmp_path, "--teacher", src)) == 0, capsys.readouterr().err
    assert not (tmp_path / "run" / "teacher").exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["teacher_path"].startswith(str(pretrained.pretrained_dir()))
