"""deit.serving: StableHLO and ONNX artifacts, each read back with its own runtime (not through
deit) and compared with the Flax model in float32; predict on them; the export's bad input."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import deit
from deit import cli, evaluate, export, serving
from deit.variants import Preprocessing

PREP = Preprocessing(32, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), crop_pct=1.0, interpolation="bilinear")
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny distilled DeiT's exported folder, with its own preprocessing and class names."""
    folder = tmp_path_factory.mktemp("serving") / "model"
    model = deit.create_model("deit_test_distilled_patch4_32")
    variables = {"params": deit.init_params(model, 3)}
    export.save_model(folder, model, variables, classes=CLASSES, **PREP.to_config())
    return folder, model, variables


@pytest.fixture(scope="module")
def artifacts(tiny):
    """Both serving formats of `tiny`, written once for the module (ONNX through the CLI)."""
    folder = tiny[0]
    stablehlo = serving.export_model(folder, "stablehlo", folder.parent / "stablehlo")
    pytest.importorskip("jax2onnx")
    assert (
        cli.main(["export", str(folder), "--format", "onnx", "--out", str(folder.parent / "onnx")])
        == 0
    )
    return {"stablehlo": stablehlo.folder, "onnx": folder.parent / "onnx"}


def model_logits(model, variables, x):
    return np.asarray(model.apply(variables, x).logits)


def batch(n, seed=5):
    return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


def test_stablehlo_deserialised_and_called_matches_the_model(tiny, artifacts):
    _, model, variables = tiny
    program = (artifacts["stablehlo"] / "model.stablehlo").read_bytes()
    exported = jax.export.deserialize(bytearray(program))
    assert str(exported.in_avals[0].shape[0]) == "b"  # the batch size is symbolic
    for n in (1, 3):  # neither is the check's batch of 2
        x = batch(n)
        got = np.asarray(exported.call(x))
        assert got.shape == (n, 10)
        assert np.max(np.abs(got - model_logits(model, variables, x))) <= 1e-4


def test_onnx_in_onnxruntime_matches_the_model(tiny, artifacts):
    ort = pytest.importorskip("onnxruntime")
    _, model, variables = tiny
    session = ort.InferenceSession(str(artifacts["onnx"] / "model.onnx"))
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [32, 32, 3]
    for n in (1, 3):
        x = batch(n)
        (got,) = session.run(["logits"], {"images": x})
        assert np.max(np.abs(got - model_logits(model, variables, x))) <= 1e-4


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_each_artifact_carries_its_preprocessing_and_check(artifacts, fmt):
    meta = json.loads((artifacts[fmt] / "serving.json").read_text())
    assert meta["format"] == fmt
    assert Preprocessing(**meta["preprocessing"]) == PREP
    assert meta["classes"] == CLASSES
    assert meta["input"]["shape"] == ["batch", 32, 32, 3] and "NHWC" in meta["input"]["layout"]
    assert 0 <= meta["check"]["max_abs_diff"] <= serving.TOLERANCE


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_predict_on_an_artifact_is_predict_on_the_model(tiny, artifacts, fmt, tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(paths[-1])
    want = evaluate.predict(tiny[0], paths, top=3)
    got = evaluate.predict(artifacts[fmt], paths, top=3)
    for g, w in zip(got, want, strict=True):
        assert [n for n, _ in g] == [n for n, _ in w]
        np.testing.assert_allclose([p for _, p in g], [p for _, p in w], atol=1e-5)
    assert cli.main(["predict", "--checkpoint", str(artifacts[fmt]), paths[0]]) == 0
    assert w[0][0] in capsys.readouterr().out


def one_line_error(capsys, args):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_unknown_format_is_one_line(tiny, tmp_path, capsys):
    err = one_line_error(
        capsys, ["export", str(tiny[0]), "--format", "tflite", "--out", str(tmp_path / "o")]
    )
    assert "'tflite' is unknown" in err and "stablehlo" in err
    assert not (tmp_path / "o").exists()


def test_a_format_without_its_extra_names_the_install_command(tiny, tmp_path, capsys, monkeypatch):
    find_spec = serving.importlib.util.find_spec
    monkeypatch.setattr(
        serving.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "jax2onnx" else find_spec(name, *a),
    )
    err = one_line_error(
        capsys, ["export", str(tiny[0]), "--format", "onnx", "--out", str(tmp_path / "o")]
    )
    assert "needs jax2onnx" in err and "pip install 'deit[onnx]'" in err


def test_an_artifact_that_fails_its_check_is_refused_and_not_kept(
    tiny, tmp_path, capsys, monkeypatch
):
    opened = serving.open_artifact

    def off(folder):  # a broken program: its logits 1e-3 away from the model's
        a = opened(folder)
        return serving.Artifact(a.folder, a.meta, lambda x: a.run(x) + 1e-3)

    monkeypatch.setattr(serving, "open_artifact", off)
    out = tmp_path / "out" / "hlo"
    err = one_line_error(
        capsys, ["export", str(tiny[0]), "--format", "stablehlo", "--out", str(out)]
    )
    assert "max |Δ| 0.001" in err and "expected at most 0.0001" in err
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []  # no hidden leftovers


def test_safetensors_stays_the_default_format(tiny, tmp_path, capsys):
    assert cli.main(["export", str(tiny[0]), "--out", str(tmp_path / "copy")]) == 0
    model, variables, config = export.load_exported(tmp_path / "copy")
    assert config["classes"] == CLASSES
    x = batch(1)
    np.testing.assert_array_equal(model_logits(model, variables, x), model_logits(*tiny[1:], x))


def test_the_latency_bench_table_and_defaults(bench_module):
    bench = bench_module("serve_latency")
    args = bench.parse(["--quick", "--batches", "1", "32"])
    assert (args.rounds, args.min_seconds, args.batches) == (2, 0.5, [1, 32])
    row = {"batch": 32, "case": "onnxruntime", "ms": 812.34, "img_per_s": 39.4}
    result = {"model": "m", "cpu": "c", "threads": 1, "rounds": 2}
    result["rows"] = [{**row, "vs_deit_jit": 0.8, "max_abs_diff": 2.5e-6}]
    assert "| 32 | onnxruntime | 812.3 | 39.4 | 0.80x | 2.5e-06 |" in bench.table(result)
