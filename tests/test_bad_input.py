"""What a user gets for bad input, at the command line: one line on stderr naming the value and
what was expected, exit code 2; or, for images PIL can read in an unusual mode, a conversion.

The library-level details (every decode mode, each validation message) live in test_data.py,
test_transforms.py, test_convert.py and test_cli.py; here each bad input goes through `deit`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import deit
from deit import cli, export
from deit.teacher import create_teacher

MODEL = "deit_test_distilled_patch4_32"
CLASSES = ["cat", "dog"]


def make_folder(root, classes=CLASSES, per_class=3, size=12):
    """`root/{train,val}/<class>/<i>.png`, random `size x size` RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def train_args(root, tmp_path, *extra):
    # The ImageNet recipe, as these tests were written for (a folder this small would get `small`).
    args = ["train", "--data", str(root), "--output", str(tmp_path / "run"), "--model", MODEL]
    args += ["--recipe", "imagenet"]
    args += ["--img-size", "16", "--distillation", "none", "--epochs", "1", "--workers", "0"]
    return [*args, "--batch-size", "8", *extra]


def one_line_error(capsys, argv) -> str:
    """Runs `deit ARGV`, checks exit code 2 and that the error is one line, the last on stderr
    (progress and data summaries may come before it), and returns that line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"deit {argv[0]}: ")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    assert errors[0].startswith(f"deit {argv[0]}: error: ")
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An exported (untrained) tiny DeiT for the classes cat and dog, at 16x16."""
    model = deit.create_model(MODEL, num_classes=2, img_size=16)
    folder = tmp_path_factory.mktemp("model")
    export.save_model(
        folder, model, {"params": deit.init_params(model, 0)}, classes=CLASSES, img_size=16
    )
    return folder


# ---------------------------------------------------------------------------------------------
# Files that are not images


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]


UNDECODABLE = {
    "zero-byte": b"",
    "truncated-jpeg": _truncated_jpeg(),
    "text-named-jpg": b"these are my holiday notes, not a photo\n",
}


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
def test_undecodable_file(kind, tmp_path, model_dir, capsys):
    root = make_folder(tmp_path / "data", per_class=4)
    bad = root / "val" / "dog" / "bad.jpg"  # evaluation reads every image
    bad.write_bytes(UNDECODABLE[kind])
    if kind == "truncated-jpeg":  # one training run; the decoder is the same for every kind
        err = one_line_error(capsys, train_args(root, tmp_path))
        assert f"cannot decode image {bad}: " in err
        assert "stopped where it was read" in err and "bad_images='skip'" in err
    assert cli.main(["data", "check", str(root), "--workers", "0"]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{bad}: ")  # listed, with why
    err = one_line_error(capsys, ["predict", "--checkpoint", model_dir, bad])
    assert f"cannot decode image {bad}: " in err


def test_data_check_lists_every_offending_path(tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=4)
    bad = [root / "train" / "cat" / "0.png", root / "val" / "cat" / "notes.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    assert cli.main(["data", "check", str(root), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(p) for p in bad]
    assert "2 unreadable image(s)" in err
    first = one_line_error(capsys, train_args(root, tmp_path, "--bad-images", "error"))
    assert any(f"cannot decode image {p}: " in first for p in bad)  # the first one read
    assert one_line_error(capsys, train_args(root, tmp_path)) == first  # error is the default


def test_image_over_the_decompression_bomb_limit(tmp_path, model_dir, monkeypatch, capsys):
    root = make_folder(tmp_path / "data", per_class=4)
    big = root / "val" / "cat" / "0.png"  # 144 pixels, more than twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    err = one_line_error(capsys, ["predict", "--checkpoint", model_dir, big])
    assert f"cannot decode image {big}: over the decompression-bomb limit" in err
    assert "MAX_IMAGE_PIXELS=50" in err
    err = one_line_error(capsys, train_args(root, tmp_path))
    assert "cannot decode image" in err and "decompression-bomb limit" in err


def test_unreadable_image_mid_epoch_keeps_the_last_checkpoint(tmp_path, capsys):
    """The run stops at the step that reads the file; checkpoints before it are kept, whole."""
    from deit import data, recipes
    from deit.checkpoint import Checkpoints

    root = make_folder(tmp_path / "data", per_class=8)
    bad = root / "train" / "dog" / "9.png"  # record 16 of 17: the last one
    bad.write_bytes(b"")
    repeats = recipes.recipe("imagenet").data.repeats  # the recipe train_args runs

    def first_read(seed: int) -> tuple[int, int] | None:
        for epoch in (0, 1):
            hits = np.argwhere(data.epoch_order(17, epoch, seed, 4, repeats) == 16)
            if len(hits):
                return epoch, int(hits[0][0])
        return None

    seed = 0  # a seed that reads it after two steps or more, so checkpoints precede it
    while (read := first_read(seed)) is None or read[0] * 4 + read[1] < 2:
        seed += 1
    epoch, step = read
    argv = train_args(root, tmp_path, "--checkpoint-every", "1", "--seed", str(seed))
    argv[argv.index("--epochs") + 1] = "2"
    argv[argv.index("--batch-size") + 1] = "4"
    err = one_line_error(capsys, argv)
    assert f"cannot decode image {bad}" in err
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints")
    try:
        assert ckpts.latest_step() == epoch * 4 + step
    finally:
        ckpts.close()


# ---------------------------------------------------------------------------------------------
# Images in unusual modes: converted to RGB, not refused


def _image(mode: str) -> tuple[Image.Image, str, dict]:
    rgb = np.random.default_rng(2).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    if mode == "I;16":
        wide = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 450).astype(np.uint16)
        return Image.fromarray(wide), "png", {}
    if mode == "1x1":
        return Image.fromarray(rgb[:1, :1]), "png", {}
    image = Image.fromarray(rgb).convert(mode)
    if mode == "P":
        return image, "png", {"transparency": 0}
    return image, "jpg" if mode in ("CMYK", "L") else "png", {}


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "L", "LA", "RGBA", "1", "1x1"])
def test_unusual_image_modes_are_converted(mode, tmp_path, model_dir, capsys):
    image, suffix, options = _image(mode)
    path = tmp_path / f"image.{suffix}"
    image.save(path, **options)
    assert cli.main(["predict", "--checkpoint", str(model_dir), str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(path)
    assert sorted(line.split()[-1] for line in lines[1:]) == CLASSES
    assert sum(float(line.split("%")[0]) for line in lines[1:]) == pytest.approx(100, abs=0.02)


def test_stray_files_are_ignored_and_modes_converted_in_a_folder(tmp_path, model_dir, capsys):
    root = make_folder(tmp_path / "data")
    for i, mode in enumerate(["CMYK", "I;16", "P", "L", "RGBA", "1x1"]):
        image, suffix, options = _image(mode)
        image.save(root / "val" / CLASSES[i % 2] / f"mode{i}.{suffix}", **options)
    for name in ("notes.txt", ".DS_Store", "README", "labels.csv"):
        (root / "val" / "cat" / name).write_text("not an image")
        (root / "train" / "dog" / name).write_text("not an image")
    report = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", model_dir, "--data", root, "--batch-size", "4"]
    assert cli.main([str(a) for a in [*argv, "--out", report]]) == 0
    assert json.loads(report.read_text())["avg"]["count"] == 2 * 3 + 6


# ---------------------------------------------------------------------------------------------
# Folder layouts


def test_empty_class_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()
    (root / "train" / "bird" / "photo.heic").write_bytes(b"\0")
    err = one_line_error(capsys, train_args(root, tmp_path))
    assert f"class folder {root / 'train' / 'bird'} holds no images; expected files" in err
    assert ".jpg" in err


def test_no_class_folders(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    Image.new("RGB", (12, 12)).save(root / "train" / "loose.png")  # images must sit in classes
    err = one_line_error(capsys, train_args(root, tmp_path))
    assert f"{root / 'train'} has no class folders; expected" in err


def test_different_classes_in_train_and_val(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "val" / "cat").rename(root / "val" / "kitten")
    (root / "val" / "bird").mkdir()
    Image.new("RGB", (12, 12)).save(root / "val" / "bird" / "0.png")
    err = one_line_error(capsys, train_args(root, tmp_path))
    assert "only in train ['cat'], only in val ['bird', 'kitten']" in err
    assert "expected the same classes in both" in err


@pytest.mark.slow
def test_bad_images_skip_reports_the_count_and_trains(tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=8)
    bad = [root / "train" / "cat" / "empty.jpg", root / "train" / "dog" / "cut.jpg"]
    bad += [root / "val" / "dog" / "notes.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(_truncated_jpeg())
    bad[2].write_text("not an image")
    assert cli.main(train_args(root, tmp_path, "--bad-images", "skip")) == 0
    err = capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val"]["avg"]["count"] == 2 * 8  # the unreadable one is left out
    # Repeated augmentation reads a third of the training images per epoch (each 3 times).
    listed = results["bad_images"]
    assert str(bad[2]) in listed and set(listed) <= {str(p) for p in bad}
    assert f"skipped {len(listed)} unreadable image(s)" in err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["bad_images"] for x in lines if x["kind"] == "train"][-1] >= 2


# ---------------------------------------------------------------------------------------------
# Checkpoints and teachers that do not fit


def test_weights_that_do_not_fit_their_config(tmp_path, model_dir, capsys):
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / export.WEIGHTS).write_bytes((model_dir / export.WEIGHTS).read_bytes())
    config = json.loads((model_dir / export.CONFIG).read_text())
    config["fields"]["depth"] = 3  # one block more than the weights hold
    (folder / export.CONFIG).write_text(json.dumps(config))
    image = tmp_path / "x.png"
    Image.new("RGB", (12, 12)).save(image)
    err = one_line_error(capsys, ["predict", "--checkpoint", folder, image])
    assert f"the weights in {folder} do not fit its config.json: missing [params/blocks_2/" in err
    root = make_folder(tmp_path / "data")
    err = one_line_error(capsys, ["eval", "--checkpoint", folder, "--data", root])
    assert "missing [params/blocks_2/attn/proj/bias" in err


def test_teacher_with_another_class_count(tmp_path, capsys):
    teacher = create_teacher("resnet8", 3, small_input=True)
    variables = jax.jit(lambda k: teacher.init(k, jnp.zeros((1, 16, 16, 3))))(jax.random.PRNGKey(0))
    folder = tmp_path / "teacher"
    export.save_model(folder, teacher, dict(variables), classes=["a", "b", "c"], img_size=16)
    root = make_folder(tmp_path / "data", per_class=4)  # a batch of 8 fits
    argv = train_args(root, tmp_path, "--distillation", "hard", "--teacher", folder)
    err = one_line_error(capsys, argv)
    assert "teacher predicts 3 classes but the student has 2" in err


class Payload:
    """Pickles as a call to os.system: plain `pickle.load` of it would create `marker`."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("layout", ["plain-pickle", "torch-zip"])
def test_pickle_naming_a_disallowed_global_is_refused(layout, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    payload = pickle.dumps({"model": {"w": [1.0]}, "x": Payload(marker)}, protocol=2)
    if layout == "plain-pickle":
        evil.write_bytes(payload)
    else:
        with zipfile.ZipFile(evil, "w") as archive:
            archive.writestr("evil/data.pkl", payload)
            archive.writestr("evil/version", "3\n")
    err = one_line_error(capsys, ["convert", evil, "--out", tmp_path / "out"])
    assert f"refusing to load {evil}: it names posix.system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Flags out of range (the unknown model and recipe, α = 2, τ = 0 and lr -1 are in test_cli.py; the
# config tree's own bad input is in test_cli_train.py)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "7"], "global batch 7 does not divide by the 2 devices; expected a "),
        (["--batch-size", "0"], "--batch-size 0; expected a positive number"),
        (
            ["--batch-size", "4096"],
            "--batch-size 4096 is larger than the 1437 training images of digits; expected "
            "--batch-size 1024 or less",
        ),
        (["--alpha", "-0.1"], "alpha -0.1 is outside [0, 1]"),
        (["--tau", "-2"], "tau -2.0; expected a positive temperature"),
        (["--lr", "0"], "lr 0.0"),
        (["--epochs", "0"], "--optim.epochs 0; expected a positive integer"),
        (["--img-size", "0"], "--data.img-size 0; expected a positive size"),
        (["--workers", "-1"], "workers -1; expected 0 (decode in this process) to "),
        (["--workers", "100000"], "workers 100000; expected 0 (decode in this process) to "),
        (["--checkpoint-every", "0"], "--checkpoint-every 0; expected 1 or more"),
        (["--log-every", "-5"], "--log-every -5; expected 1 or more"),
        (
            ["--distillation", "hard", "--teacher", "/nonexistent/teacher"],
            "teacher.path '/nonexistent/teacher' is not a folder; expected an exported model",
        ),
    ],
)
def test_out_of_range_train_flags(flags, message, tmp_path, capsys):
    argv = ["train", "--output", tmp_path / "run", "--model", MODEL, "--img-size", "16"]
    argv += ["--distillation", "none", *flags]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Packed shards


def test_pack_into_a_non_empty_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = one_line_error(capsys, ["data", "pack", root, "--out", out])
    assert f"{out} is not empty; expected a new or empty folder" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_pack_continues_only_an_unchanged_folder(tmp_path, monkeypatch, capsys):
    from deit.data import shards

    root = make_folder(tmp_path / "data")
    out = tmp_path / "shards"
    calls = []

    def fail_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk pulled out")
        return real(*args)

    real = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", fail_second)
    with pytest.raises(OSError, match="disk pulled out"):
        shards.pack(root, out, records_per_shard=2, threads=1, progress=False)
    monkeypatch.setattr(shards, "_write_shard", real)
    (root / "train" / "cat" / "0.png").unlink()  # the listing the first shard came from is gone
    err = one_line_error(capsys, ["data", "pack", root, "--out", out, "--records-per-shard", "2"])
    assert "is not empty" in err and "unchanged folder" in err
    err = one_line_error(capsys, [*train_args(root, tmp_path), "--data", out])
    assert "unfinished pack" in err


@pytest.mark.slow
def test_shards_with_another_class_list_than_the_checkpoint(tmp_path, capsys):
    cats = make_folder(tmp_path / "cats", per_class=4)
    birds = make_folder(tmp_path / "birds", classes=["bird", "cat"], per_class=4)
    for name, folder in (("cat-shards", cats), ("bird-shards", birds)):
        assert cli.main(["data", "pack", str(folder), "--out", str(tmp_path / name)]) == 0
    assert cli.main(train_args(tmp_path / "cat-shards", tmp_path)) == 0
    capsys.readouterr()
    resume = train_args(tmp_path / "bird-shards", tmp_path, "--resume")
    err = one_line_error(capsys, resume)
    assert "was trained on 2 classes ['cat', 'dog']" in err and "['bird', 'cat']" in err
    evaluate = ["eval", "--checkpoint", tmp_path / "run", "--data", tmp_path / "bird-shards"]
    assert "was trained on classes ['cat', 'dog']" in one_line_error(capsys, evaluate)
