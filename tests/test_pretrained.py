"""Official weights by name, against a loopback server (127.0.0.1 only): the official download
with its hash prefix, a Hugging Face Hub endpoint in both layouts, the cache, and the failures."""

import dataclasses
import hashlib
import http.server
import io
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors
from test_convert import HF_TINY, hf_model, images, numpy_sd, timm_heads, timm_model

import deit
from deit import cli, export, pretrained, variants

NAME = "deit_test_distilled_patch4_32"  # a tiny variant stands in for the official ones
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes); `server.cut` paths stop halfway through."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, body_wanted: bool) -> None:
        self.server.requests.append((self.command, self.path))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body_wanted:
            if self.path in self.server.cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)  # the server goes away mid-file
                return
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(True)

    def do_HEAD(self) -> None:
        self._send(False)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut, httpd.requests = {}, set(), []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _pth(state_dict: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": state_dict}, buffer)
    return buffer.getvalue()


@pytest.fixture
def official(server, monkeypatch, deit_home):
    """A random timm DeiT under its official-style name `NAME-<sha256[:8]>.pth`, registered."""
    ref = timm_model(NAME, seed=3)
    body = _pth(ref.state_dict())
    file = f"{NAME}-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/deit/{file}"] = body
    entry = pretrained.Weights(NAME, file, 0.0, 0.0, url_base=f"{server.url}/deit/")
    monkeypatch.setitem(pretrained.PRETRAINED, NAME, entry)
    return ref, entry


def _logits(folder) -> dict:
    model, variables, _ = export.load_exported(folder)
    out = jax.jit(model.apply)(variables, images(32)[1])
    return {"cls": out.cls_logits, "dist": out.dist_logits, "avg": out.logits}


def test_official_download_converts_once_and_matches_timm(official, server, deit_home):
    ref, entry = official
    model, variables = deit.create_model(NAME, pretrained=True)
    want = timm_heads(ref, images(32)[0])
    out = model.apply(variables, images(32)[1])
    for head, got in (("cls", out.cls_logits), ("dist", out.dist_logits), ("avg", out.logits)):
        np.testing.assert_allclose(np.asarray(got), want[head], rtol=0, atol=1e-5)
    assert (deit_home / "downloads" / entry.file).is_file()
    folder = deit_home / "pretrained" / NAME / "official"
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == NAME and config["crop_pct"] == deit.get_spec(NAME).crop_pct
    assert server.requests == [("GET", f"/deit/{entry.file}")]
    # The second load reads the converted folder: no request, no conversion.
    stamp = (folder / "params.safetensors").stat().st_mtime_ns
    again, _ = deit.load_pretrained(NAME)
    assert again == model and len(server.requests) == 1
    assert (folder / "params.safetensors").stat().st_mtime_ns == stamp
    # Another class count: the network is kept, the heads start fresh.
    small, small_vars = deit.create_model(NAME, pretrained=True, num_classes=3)
    assert small.num_classes == 3 and small_vars["params"]["cls_head"]["kernel"].shape == (32, 3)
    np.testing.assert_array_equal(
        small_vars["params"]["pos_embed"], variables["params"]["pos_embed"]
    )


def test_a_corrupted_byte_is_refused_and_not_cached(official, server, deit_home, capsys):
    _, entry = official
    path = f"/deit/{entry.file}"
    body = bytearray(server.files[path])
    body[len(body) // 2] ^= 0xFF
    server.files[path] = bytes(body)
    assert cli.main(["eval", "--pretrained", NAME]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "downloading" note
    assert err.startswith("deit eval: error: ") and "refused and not cached" in err
    assert f"not the {entry.sha256_prefix} its name promises" in err
    assert list((deit_home / "downloads").iterdir()) == []
    assert not (deit_home / "pretrained").exists() or not any(
        (deit_home / "pretrained").rglob("*.safetensors")
    )


def test_a_download_cut_off_leaves_nothing_and_the_next_call_starts_again(
    official, server, deit_home
):
    _, entry = official
    path = f"/deit/{entry.file}"
    server.cut.add(path)
    with pytest.raises(deit.errors.InputError, match="broke off after"):
        pretrained.pretrained_folder(NAME)
    assert list((deit_home / "downloads").iterdir()) == []
    server.cut.clear()
    folder = pretrained.pretrained_folder(NAME)
    assert (folder / "params.safetensors").is_file()
    assert server.requests.count(("GET", path)) == 2


def test_http_errors_and_no_network_are_one_line(server, monkeypatch, deit_home, capsys):
    missing = pretrained.Weights(NAME, f"{NAME}-deadbeef.pth", 0, 0, url_base=f"{server.url}/x/")
    monkeypatch.setitem(pretrained.PRETRAINED, NAME, missing)
    assert cli.main(["predict", "--pretrained", NAME, "img.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"HTTP 404 Not Found for {server.url}/x/{NAME}-deadbeef.pth" in err
    # Nothing listens on this port: what a machine without network sees.
    with socket_closed() as port:
        gone = dataclasses.replace(missing, url_base=f"http://127.0.0.1:{port}/")
        monkeypatch.setitem(pretrained.PRETRAINED, NAME, gone)
        assert cli.main(["eval", "--model", NAME, "--pretrained"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot download http://127.0.0.1:{port}/" in err, err
    assert str(deit_home / "downloads" / gone.file) in err and "local checkpoint file" in err


class socket_closed:
    """A loopback port that was free a moment ago (nothing answers there)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


HUB_SCRIPT = """
import sys
import numpy as np
from deit import export, pretrained
import jax
import jax.numpy as jnp

name, layout, out = sys.argv[1:]
pretrained.PRETRAINED[name] = pretrained.Weights(name, name + "-00000000.pth", 0, 0)
folder = pretrained.pretrained_folder(name, layout)
model, variables, _ = export.load_exported(folder)
x = np.load(out + ".in.npy")
o = jax.jit(model.apply)(variables, x)
np.save(out, np.stack([o.cls_logits, o.logits]))
print(folder)
"""


def _hub_run(tmp_path, server, layout, offline=False):
    """`pretrained_folder(NAME, layout)` in a fresh process whose environment points the Hub
    client at the loopback server (HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE are read at import)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
    env["HF_HUB_DISABLE_XET"] = "1"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = str(tmp_path / f"logits-{layout}")
    np.save(out + ".in.npy", images(32)[1])
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, NAME, layout, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, out + ".npy"


@pytest.mark.parametrize("layout", ["hf", "timm"])
def test_hub_layouts_through_hf_endpoint(layout, server, deit_home, tmp_path):
    entry = pretrained.Weights(NAME, f"{NAME}-00000000.pth", 0, 0)
    if layout == "hf":
        ref = hf_model("DeiTForImageClassificationWithTeacher", HF_TINY, seed=4)
        repo = entry.hf_repo
        with torch.no_grad():
            out = ref(pixel_values=images(32)[0])
        want = np.stack([out.cls_logits.numpy(), out.logits.numpy()])
    else:
        ref = timm_model(NAME, seed=5)
        repo = entry.timm_repo
        heads = timm_heads(ref, images(32)[0])
        want = np.stack([heads["cls"], heads["avg"]])
    server.files[f"/{repo}/resolve/main/model.safetensors"] = save_safetensors(numpy_sd(ref))
    done, logits = _hub_run(tmp_path, server, layout)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(logits), want, rtol=0, atol=1e-5)
    assert (tmp_path / "hf" / "hub").is_dir()  # the file sits in the Hub's cache (HF_HOME)
    files = lambda: [r for r in server.requests if r[0] == "GET" and "/resolve/" in r[1]]
    fetched = files()
    assert fetched == [("GET", f"/{repo}/resolve/main/model.safetensors")]
    # Offline: the Hub's cache answers (the converted folder removed, so it is converted again).
    import shutil

    shutil.rmtree(deit_home / "pretrained")
    done, _ = _hub_run(tmp_path, server, layout, offline=True)
    assert done.returncode == 0, done.stderr
    assert files() == fetched
    # Offline with an empty Hub cache: one line saying what to do.
    shutil.rmtree(deit_home / "pretrained")
    shutil.rmtree(tmp_path / "hf")
    done, _ = _hub_run(tmp_path, server, layout, offline=True)
    assert done.returncode != 0 and "offline, or no network" in done.stderr


def test_cache_list_and_clear(official, deit_home, capsys):
    pretrained.pretrained_folder(NAME)
    assert cli.main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert str(deit_home) in listed and f"pretrained/{NAME}/official" in listed
    assert official[1].file in listed
    # A copy converted from another URL of the same file is the name's too; others' are not.
    url_copy = pretrained.pretrained_dir() / official[1].file.partition(".")[0] / "url"
    other = pretrained.pretrained_dir() / "other-12345678" / "url"
    for folder in (url_copy, other):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    assert cli.main(["cache", "clear", NAME]) == 0
    assert "3 entries removed" in capsys.readouterr().out
    assert [p for p, _ in pretrained.cache_entries()] == [other]


def test_the_registry_names_the_official_files():
    deit_weights = {n: w for n, w in pretrained.PRETRAINED.items() if w.pinned}
    assert set(pretrained.PRETRAINED) - set(deit_weights) == set(pretrained.DEIT3_PRETRAINED)
    for name, w in deit_weights.items():
        assert w.url == f"https://dl.fbaipublicfiles.com/deit/{name}-{w.sha256_prefix}.pth"
        assert len(w.sha256_prefix) == 8
        assert w.hf_repo == "facebook/" + name.replace("_", "-")
        assert w.timm_repo == f"timm/{name}.fb_in1k"
        # The registry's eval crop: 0.875 at 224, the whole image at 384 (official README).
        spec = deit.get_spec(name)
        assert spec.crop_pct == (1.0 if spec.img_size == 384 else 0.875)
    assert len(deit_weights) == 8


def test_a_384_model_is_evaluated_uncropped_by_every_command(
    server, monkeypatch, deit_home, tmp_path, capsys
):
    """The registry's preprocessing travels in the converted folder's config.json: crop 1.0 at
    384 for `deit eval`, `predict` and `visualize` alike (a narrow network under the real name)."""
    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer

    from deit import transforms, variants
    from deit.data import pipeline

    name = "deit_base_patch16_384"
    small = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10)
    monkeypatch.setitem(
        variants.VARIANTS, name, dataclasses.replace(variants.VARIANTS[name], **small)
    )
    torch.manual_seed(0)
    ref = VisionTransformer(
        img_size=384, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
        num_classes=10,
    )  # fmt: skip
    body = _pth(ref.state_dict())
    file = f"{name}-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/deit/{file}"] = body
    entry = pretrained.Weights(name, file, 82.9, 96.2, url_base=f"{server.url}/deit/")
    monkeypatch.setitem(pretrained.PRETRAINED, name, entry)
    crops = []
    real = transforms.eval_transform

    def spy(img, size, crop_pct=0.875, interpolation="bicubic"):
        crops.append((size, crop_pct))
        return real(img, size, crop_pct, interpolation)

    monkeypatch.setattr(transforms, "eval_transform", spy)
    monkeypatch.setattr(pipeline, "eval_transform", spy)
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(image)
    assert cli.main(["predict", "--pretrained", name, str(image)]) == 0
    out = tmp_path / "pictures"
    assert cli.main(["visualize", "--pretrained", name, str(image), "--out", str(out)]) == 0
    commands = len(crops)
    assert cli.main(["eval", "--pretrained", name, "--data", "digits", "--workers", "0"]) == 0
    assert commands == 2 and len(crops) > commands  # eval cropped the val images too
    assert set(crops) == {(384, 1.0)}
    config = json.loads((deit_home / "pretrained" / name / "official" / "config.json").read_text())
    assert config["crop_pct"] == 1.0 and config["img_size"] == 384


def test_a_pretrained_name_is_a_teacher(official, deit_home):
    from deit import recipes
    from deit.run import resolve_teacher

    ref, _ = official
    cfg = recipes.digits()
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=NAME))
    teacher, folder = resolve_teacher(cfg, None, None, resume=False)
    assert folder == deit_home / "pretrained" / NAME / "official"
    assert teacher.num_classes == 10
    # The teacher takes [0, 1] images and applies the folder's own normalisation.
    x01 = (images(32)[1] * 0.1 + 0.5).clip(0, 1)
    prep = variants.Preprocessing.from_config(
        json.loads((folder / "config.json").read_text()), None
    )
    want = timm_heads(
        ref,
        torch.from_numpy(
            np.asarray(prep.normalize((x01 * 255).round().astype(np.uint8)))
            .transpose(0, 3, 1, 2)
            .copy()
        ),
    )
    got = np.asarray(teacher(jnp.asarray((x01 * 255).round() / 255, jnp.float32)))
    np.testing.assert_allclose(got, want["avg"], rtol=0, atol=1e-4)
