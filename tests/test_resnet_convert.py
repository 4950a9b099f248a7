"""torchvision / timm ResNets as teachers: logits against live torchvision and timm (random
weights), the padding that makes them equal, conversion both ways through files and the CLI,
the weights by name through the cache (a loopback server), and the one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from test_bad_input import one_line_error
from test_pretrained import _pth, server  # noqa: F401 -- the loopback server fixture

import deit
from deit import cli, export, pretrained, teacher_source
from deit import resnet_convert as rc
from deit.configs import TeacherConfig, TrainConfig
from deit.errors import InputError
from deit.teacher import ResNet, registered_resnet


def random_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` in eval mode with BatchNorm weights and running statistics drawn at random (the
    init leaves them at 1/0, which would hide a misplaced tensor), kept near unit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model.eval()


def reference(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "tv_resnet18":
        return random_stats(torchvision.models.resnet18(num_classes=num_classes), seed)
    return random_stats(timm.create_model(name, num_classes=num_classes), seed)


def images(seed: int = 0, h: int = 64, w: int = 80) -> tuple[jnp.ndarray, torch.Tensor]:
    x = np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)
    return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def torch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def numpy_sd(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "ours"),
    [("tv_resnet18", "resnet18"), ("resnet26", "resnet26"), ("resnet50", "resnet50")],
)
def test_logits_match_torchvision_and_timm(name, ours):
    ref = reference(name)
    sd = numpy_sd(ref)
    model = rc.infer_resnet(sd)
    assert model.padding == "torch" and registered_resnet(model) == ours
    variables = rc.from_torch(sd, model)
    x, xt = images()
    want = torch_logits(ref, xt)
    got = np.asarray(model.apply(variables, x))
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    # Flax's SAME padding shifts every stride-2 window: the weights then give other logits.
    same = np.asarray(model.clone(padding="same").apply(variables, x))
    assert np.abs(same - want).max() > 1e-2 * scale


def test_round_trip_through_files_and_the_cli(tmp_path, capsys):
    ref = reference("tv_resnet18", num_classes=1000, seed=1)
    src = tmp_path / "resnet18-00000000.pth"
    torch.save(ref.state_dict(), src)  # torchvision's files hold the bare state dict
    out = tmp_path / "flax"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "ResNet" and config["variant"] == "resnet18"
    assert config["fields"]["padding"] == "torch" and config["dataset"] == "imagenet-1k"
    assert config["crop_pct"] == 0.875 and config["interpolation"] == "bilinear"
    model, variables, _ = export.load_exported(out)
    x, xt = images(1)
    want = torch_logits(ref, xt)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0, atol=1e-4)
    # Back to the torch layout: torchvision loads it strictly and gives the same logits.
    assert cli.main(["convert", str(out), "--to", "timm", "--out", str(tmp_path / "t")]) == 0
    from safetensors.torch import load_file

    again = torchvision.models.resnet18().eval()
    again.load_state_dict(load_file(str(tmp_path / "t" / "model.safetensors")), strict=True)
    np.testing.assert_allclose(torch_logits(again, xt), want, rtol=0, atol=1e-6)
    # Another class count keeps the body and draws a fresh head.
    small = tmp_path / "small"
    argv = ["convert", str(src), "--out", str(small), "--num-classes", "3"]
    assert cli.main(argv) == 0
    m3, v3, c3 = export.load_exported(small)
    assert m3.num_classes == 3 and "dataset" not in c3
    np.testing.assert_array_equal(
        v3["params"]["conv_init"]["kernel"], variables["params"]["conv_init"]["kernel"]
    )
    capsys.readouterr()


@pytest.fixture
def torchvision_resnet18(server, monkeypatch, deit_home):  # noqa: F811 -- the imported fixture
    """A random torchvision ResNet-18 served as `resnet18-<sha256[:8]>.pth` in place of the
    registry's file."""
    ref = reference("tv_resnet18", num_classes=1000, seed=4)
    body = _pth(ref.state_dict())
    file = f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/models/{file}"] = body
    entry = dataclasses.replace(
        pretrained.TEACHER_WEIGHTS["resnet18"], file=file, url_base=f"{server.url}/models/"
    )
    monkeypatch.setitem(pretrained.TEACHER_WEIGHTS, "resnet18", entry)
    return ref, entry


def test_the_registry_names_torchvisions_files():
    r18, r50 = pretrained.TEACHER_WEIGHTS["resnet18"], pretrained.TEACHER_WEIGHTS["resnet50"]
    assert r18.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert r50.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert r18.sha256_prefix == "f37072fd" and r50.sha256_prefix == "11ad3fa6"
    assert r18.timm_repo == "timm/resnet18.tv_in1k" and r50.timm_repo == "timm/resnet50.tv2_in1k"
    assert (r18.top1, r50.top1) == (69.758, 80.858)
    # torchvision's evaluation transforms: resize 256 (232 for resnet50's V2) -> crop 224.
    assert r18.preprocessing.crop_pct == 0.875 and r50.preprocessing.crop_pct == 224 / 232
    assert r50.preprocessing.interpolation == "bilinear"


def test_a_resnet_by_name_downloads_and_converts_once(torchvision_resnet18, server, deit_home):  # noqa: F811
    ref, entry = torchvision_resnet18
    model, variables = deit.load_teacher("resnet18")
    assert isinstance(model, ResNet) and model.padding == "torch"
    x, xt = images(2)
    want = torch_logits(ref, xt)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0, atol=1e-4)
    folder = deit_home / "pretrained" / "resnet18" / "official"
    config = json.loads((folder / export.CONFIG).read_text())
    assert config["crop_pct"] == 0.875 and config["interpolation"] == "bilinear"
    stamp = (folder / export.WEIGHTS).stat().st_mtime_ns
    deit.load_teacher("resnet18")
    assert teacher_source.teacher_folder(entry.url) == folder
    assert server.requests == [("GET", f"/models/{entry.file}")]
    assert (folder / export.WEIGHTS).stat().st_mtime_ns == stamp


def test_the_resnet_names_still_train_from_scratch():
    """`--teacher-model resnet50` alone is a network to train (as before); `--teacher resnet50`
    takes torchvision's weights."""
    cfg = TrainConfig(teacher=TeacherConfig(arch="resnet50"))
    assert teacher_source.given(cfg).teacher.path is None
    paper = TrainConfig(teacher=TeacherConfig(arch="regnety_160"))
    assert teacher_source.given(paper).teacher.path == "regnety_160"


def test_a_checkpoint_of_another_architecture_than_the_name(tmp_path, capsys):
    src = tmp_path / "r18.pth"
    torch.save(reference("tv_resnet18").state_dict(), src)
    err = one_line_error(capsys, ["convert", src, "--model", "resnet50", "--out", tmp_path / "o"])
    assert f"{src} holds a resnet18 (basic blocks 2-2-2-2, 64 filters)" in err
    assert "not the resnet50 its name asks for (bottleneck blocks 3-4-6-3, 64 filters)" in err
    err = one_line_error(capsys, ["convert", src, "--model", "resnet19", "--out", tmp_path / "o"])
    assert "resnet19" in err and "resnet18" in err


def test_a_bare_body_needs_a_class_count(tmp_path):
    sd = {k: v for k, v in numpy_sd(reference("tv_resnet18")).items() if not k.startswith("fc.")}
    with pytest.raises(InputError, match="no fc; expected num_classes"):
        rc.infer_resnet(sd)
    model = rc.infer_resnet(sd, num_classes=5)
    assert model.num_classes == 5
    variables = rc.from_torch(
        sd | {"fc.weight": np.zeros((9, 512), np.float32)}, model, drop_heads=True
    )
    assert variables["params"]["head"]["kernel"].shape == (512, 5)
    with pytest.raises(InputError, match=r"shape mismatches \(2\)"):
        rc.from_torch(
            sd | {"fc.weight": np.zeros((9, 512), np.float32), "fc.bias": np.zeros(9, np.float32)},
            model,
        )
