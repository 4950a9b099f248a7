import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import deit
from deit import cli, cli_messages, convert, data
from deit.class_names import imagenet_classes


@pytest.mark.slow
def test_train_eval_predict_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--output", str(out), "--epochs", "1", "--teacher-epochs", "1"]
    args += ["--model", "deit_test_distilled_patch4_32", "--batch-size", "64", "--seed", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for row in ("teacher", "class head", "distillation head", "averaged heads"):
        assert row in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["val"]) == {"cls", "dist", "avg"}
    assert "top1" in results["teacher"]
    from test_visualize import assert_drawn

    assert_drawn(out / "curves.png")
    assert (out / "teacher" / "final" / "config.json").is_file()
    # Each run records what it used: the teacher's settings name the teacher, not the student.
    teacher_cfg = json.loads((out / "teacher" / "final" / "train_config.json").read_text())
    assert teacher_cfg["model"]["name"] == "resnet8" and teacher_cfg["optim"]["epochs"] == 1
    assert teacher_cfg["loss"]["distillation"] == "none"
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["model"]["name"] == "deit_test_distilled_patch4_32"
    assert run_cfg["optim"]["epochs"] == 1 and run_cfg["teacher"]["optim"]["epochs"] == 1
    assert any((out / "tb").iterdir())

    # The teacher in the output folder is reused, not trained again.
    mtime = (out / "teacher" / "final" / "params.safetensors").stat().st_mtime_ns
    again = ["train", "--output", str(tmp_path / "run2"), "--teacher", str(out / "teacher")]
    again += ["--epochs", "1", "--model", "deit_test_distilled_patch4_32", "--batch-size", "64"]
    capsys.readouterr()
    assert cli.main([*again, "--remat", "--quiet"]) == 0
    assert (out / "teacher" / "final" / "params.safetensors").stat().st_mtime_ns == mtime
    quiet = capsys.readouterr()
    assert "[student]" not in quiet.err and "recipe" not in quiet.err  # no header, no progress
    assert "averaged heads" in quiet.out  # the results still
    exported = json.loads((tmp_path / "run2" / "final" / "config.json").read_text())
    assert exported["fields"]["remat"] is True
    capsys.readouterr()

    report = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(out), "--data", "digits", "--out", str(report)]
    assert cli.main([*argv, "--per-class"]) == 0
    evaluated = json.loads(report.read_text())
    # Evaluating the exported final model reproduces the run's own final numbers.
    assert evaluated["avg"]["top1"] == pytest.approx(results["val"]["avg"]["top1"])
    printed = capsys.readouterr().out
    assert "averaged heads" in printed
    # Per class: the run's own class names, every image counted once, the same overall top-1.
    rows = evaluated["per_class"]
    assert [r["name"] for r in rows] == [str(i) for i in range(10)]
    assert sum(r["count"] for r in rows) == evaluated["avg"]["count"] == 360
    overall = sum(r["top1"] * r["count"] for r in rows) / 360
    assert overall == pytest.approx(evaluated["avg"]["top1"])
    assert f"    9  9  {rows[9]['top1']:7.2f}  {rows[9]['count']:>6}" in printed

    _, val = data.digits()
    image = tmp_path / "digit.png"
    Image.fromarray(val.load(0)).save(image)
    assert cli.main(["predict", "--checkpoint", str(out), str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 6  # the file, then the top 5
    probs = [float(x.split("%")[0]) for x in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01


def test_convert_round_trip_from_the_cli(tmp_path, capsys):
    # 1000 classes, like the official heads: the converted folder predicts ImageNet's names.
    model = deit.create_model("deit_test_distilled_patch4_32", num_classes=1000)
    params = deit.init_params(model, 3)
    src = tmp_path / "weights.safetensors"
    convert.save_torch(convert.to_torch(params, model), src)
    out = tmp_path / "flax"
    assert (
        cli.main(
            ["convert", str(src), "--model", "deit_test_distilled_patch4_32", "--out", str(out)]
        )
        == 0
    )
    # Written with the user's umask, like any file they write (not mkstemp's 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "params.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    _, variables, _ = deit.export.load_model(out)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    a = model.apply({"params": params}, x).logits
    b = model.apply(variables, x).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = tmp_path / "timm"
    assert cli.main(["convert", str(out), "--out", str(back), "--to", "timm"]) == 0
    sd = convert.load_state_dict(back / "model.safetensors")
    np.testing.assert_array_equal(
        sd["head_dist.weight"], convert.to_torch(params, model)["head_dist.weight"]
    )

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(out), "--top", "3", str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    names = [line.split("%", 1)[1].strip() for line in lines[1:]]
    assert set(names) <= set(imagenet_classes()) and not any(n.isdigit() for n in names)
    assert cli.main(["predict", "--checkpoint", str(out), "--top", "0", str(image)]) == 2
    assert capsys.readouterr().err.strip() == (
        "deit predict: error: --top 0; expected 1 or more classes to show"
    )


def test_info_lists_the_reference_variants():
    done = subprocess.run(
        [sys.executable, "-m", "deit.cli", "info"], capture_output=True, text=True, check=True
    )
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert rows["deit_tiny_distilled_patch16_224"] == ["5,910,800", "2.52"]
    assert rows["deit_base_distilled_patch16_224"][0] == "87,338,192"
    assert "deit_base_distilled_patch16_384" in rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--alpha", "2"], "alpha 2.0 is outside [0, 1]"),
        (["train", "--tau", "0"], "tau 0.0; expected a positive temperature"),
        (["train", "--lr", "-1"], "lr -1.0"),
        (["train", "--model", "deit_huge"], "unknown model 'deit_huge'"),
        (["train", "--recipe", "cifar"], "unknown recipe 'cifar'"),
        (["train", "--data", "/nonexistent/folder", "--epochs", "1"], "is not a folder"),
        (["eval", "--checkpoint", "/nonexistent"], "holds no exported model"),
    ],
)
def test_bad_flags_are_one_line_errors(args, message, capsys, tmp_path):
    assert (
        cli.main([*args, *(["--output", str(tmp_path / "o")] if args[0] == "train" else [])]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_internal_error_is_reported_as_a_bug_with_its_traceback(monkeypatch, capsys):
    from deit import cli_train

    def broken(argv):
        return {}["no such key"]  # a bug, not bad input

    monkeypatch.setattr(cli_train, "parse", broken)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'no such key'" in err
    assert err.strip().splitlines()[-1].startswith("deit train: internal error: this is a bug")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_user_error(how, monkeypatch, capsys):
    argv = ["train", "--batch-size", "0"]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("DEIT_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == (
        "deit train: error: --batch-size 0; expected a positive number"
    )


def test_only_real_settings_become_flags():
    msg = cli_messages.user_message(
        ValueError("cannot read model.safetensors; lower optim.base_lr")
    )
    assert msg == "cannot read model.safetensors; lower --optim.base-lr"


def test_help_into_a_closed_pipe_is_not_a_bug():
    done = subprocess.run(
        f"{sys.executable} -m deit.cli train --help | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.startswith("usage: deit train")
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


@pytest.mark.parametrize("error", ["NoSpaceError", "ENOSPC"])
def test_a_full_disk_line_starts_a_line_of_its_own(error, monkeypatch, capsys):
    """A writer thread left stderr mid-line (Orbax's failing writes do): the one-line error
    still starts a line, so a user, and `deit train`'s callers, find it whole."""
    import errno

    from deit import cli_train
    from deit.errors import NoSpaceError

    def full(argv):
        sys.stderr.write("    await ts.open(")  # a traceback line, cut by the thread switch
        if error == "NoSpaceError":
            raise NoSpaceError("no space left on the device for /run/checkpoints/26: ...")
        raise OSError(errno.ENOSPC, "No space left on device", "/run/checkpoints/26")

    monkeypatch.setattr(cli_train, "parse", full)
    assert cli.main(["train"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [ln for ln in lines if ln.startswith("deit train: error:")] == [lines[-1]]
    assert "/run/checkpoints/26" in lines[-1]


def test_predict_features_from_the_cli(tmp_path, capsys):
    model = deit.create_model("deit_test_patch4_32")
    deit.export.save_model(tmp_path / "m", model, {"params": deit.init_params(model, 0)})
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "f.npy"
    args = ["predict", "--checkpoint", str(tmp_path / "m"), "--features"]
    assert cli.main([*args, str(out), str(tmp_path)]) == 0
    assert np.load(out).shape == (1, model.embed_dim)
    assert f"wrote pre-logits (1, {model.embed_dim}) to {out}" in capsys.readouterr().out
    assert cli.main([*args, str(tmp_path / "f.bin"), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("expected a file name ending in .npy")
