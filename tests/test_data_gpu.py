"""The GPU input path (`--data.decode gpu`) on the CPU, through its host decoder: the draws equal
the host path's, each device op is Pillow's within stated tolerances, and the batches have the
host path's shapes, determinism, resume and bad-image behaviour."""

from __future__ import annotations

import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deit import data
from deit.data import device_augment, gpu, host, randaugment
from deit.data.randaugment import RandAugment

RA = "rand-m9-mstd0.5-inc1"


def _photo(h: int, w: int, seed: int, grain: float = 6.0) -> np.ndarray:
    """A smooth colour field with a little grain: what a resize sees in a photograph."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            128 + 90 * np.sin(x / (7.0 + seed % 5) + seed),
            128 + 90 * np.cos(y / 5.0 + x / 23.0),
            128 + 60 * np.sin((x + y) / 9.0),
        ],
        -1,
    )
    return np.clip(base + r.normal(0, grain, base.shape), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _cfg(**kw) -> data.DataConfig:
    base = dict(img_size=32, scale=(0.25, 1.0), randaugment=RA, workers=0, repeats=1)
    return data.DataConfig(**{**base, **kw})


@pytest.fixture
def jpeg_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DEIT_HOME", str(tmp_path / "home"))
    root = tmp_path / "jpegs"
    for split, n in (("train", 8), ("val", 2)):
        for k, c in enumerate(("a", "b")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (60, 80) if i % 2 else (80, 60)
                seed = 100 * (split == "val") + 10 * k + i
                (root / split / c / f"{i}.jpg").write_bytes(_jpeg(_photo(h, w, seed)))
    return root


def _gpu_batches(source, cfg, **kw) -> list[dict]:
    batches = list(data.train_batches(source, cfg, seed=3, global_batch=4, **kw))
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


# ---------------------------------------------------------------------------------------------
# The draws


def test_draws_are_the_host_paths():
    """`draw_train` consumes the generator exactly as `train_transform_encoded` does, and gives
    the box, flip and ops the host path applies."""
    ra = RandAugment.from_string(RA)
    cfg = _cfg(img_size=24)
    for seed in range(40):
        img = _photo(50, 70, seed)
        raw = _jpeg(img)
        a, b = np.random.default_rng([seed, 1, 2]), np.random.default_rng([seed, 1, 2])
        d = gpu.draw_train(50, 70, a, cfg, ra)
        host.train_transform_encoded(raw, b, 24, scale=cfg.scale, randaugment=ra, dct=False)
        assert a.random() == b.random()  # the same number of draws
        c = np.random.default_rng([seed, 1, 2])
        assert d.box == host.random_resized_crop_box(50, 70, c, cfg.scale, cfg.ratio)
        assert d.flip == (c.random() < 0.5)
        drawn = ra.draw(c)
        assert [ra.ops[i] for i in d.op if i >= 0] == [o.name for o in drawn]


def test_randaugment_draw_then_apply_is_augment():
    ra = RandAugment.from_string(RA)
    img = Image.fromarray(_photo(30, 40, 1))
    for seed in range(30):
        a = ra.augment(img, np.random.default_rng(seed))
        b = ra.apply(img, ra.draw(np.random.default_rng(seed)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Each device op against Pillow


@pytest.mark.parametrize(
    "name", sorted(set(randaugment.RAND_TRANSFORMS + randaugment.RAND_INCREASING_TRANSFORMS))
)
def test_each_device_op_is_pillows(name):
    """Bit-identical but for: AutoContrast's LUT (float32 where Pillow uses double: one grey
    level, on under 2% of pixels) and the geometric ops' coordinates (float32: one grey level,
    on under 0.5% of pixels)."""
    ra = RandAugment.from_string(RA)
    rng = np.random.default_rng(0)
    for seed in range(5):
        img = _photo(40, 48, seed, grain=20.0)
        level, sign = rng.uniform(0, 1), float(rng.choice([-1.0, 1.0]))
        ref = np.asarray(randaugment._OPS[name](Image.fromarray(img), level, sign, ra))
        arg = np.zeros(device_augment.OP_ARGS, np.float32)
        values = randaugment.op_args(name, level, sign, ra, (48, 40))
        arg[: len(values)] = values
        got = device_augment.apply_op(
            name, jnp.asarray(img, jnp.float32), jnp.asarray(arg), ra.fill
        )
        diff = np.abs(np.asarray(got).astype(int) - ref)
        assert diff.max() <= 1, (name, seed)
        assert (diff > 0).mean() <= 0.02, (name, seed)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_resize_is_close_to_pillows(interpolation):
    """Crop + resize on the device against Pillow's `crop(box).resize(size)`, random-resized
    crops of photo-like images to 32 and 64: mean difference under 0.25 grey levels, none over 8
    (the rounding between the two passes, where the pass order differs from Pillow 13's)."""
    resample = getattr(Image.Resampling, interpolation.upper())
    diffs = []
    for seed in range(12):
        h, w = (120, 90) if seed % 2 else (90, 120)
        img = _photo(h, w, seed)
        box = host.random_resized_crop_box(h, w, np.random.default_rng(seed))
        out = 32 if seed < 6 else 64
        top, left, ch, cw = box
        ref = np.asarray(
            Image.fromarray(img[top : top + ch, left : left + cw]).resize((out, out), resample)
        )
        pad = np.zeros((1, 256, 256, 3), np.uint8)
        pad[0, :h, :w] = img
        got = device_augment.resize_crops(
            jnp.asarray(pad), jnp.asarray([box]), (out, out), interpolation
        )
        diffs.append(np.abs(np.asarray(got)[0] - ref))
    assert max(d.max() for d in diffs) <= 8
    assert np.mean([d.mean() for d in diffs]) < 0.25


# ---------------------------------------------------------------------------------------------
# Batches


def test_gpu_batches_match_the_host_paths(jpeg_folder):
    """Same shapes, dtypes, labels; pixels close (the host decoder is the host path's, so only
    the resize and RandAugment arithmetic differ: mean under 1 grey level; an op that
    thresholds, like Equalize after AutoContrast, can turn a difference of one grey level into
    more on a few pixels)."""
    train, _ = data.image_folder(jpeg_folder)
    cfg = _cfg(decode_scaling=False)
    host_batches = list(data.train_batches(train, cfg, seed=3, global_batch=4))
    stream = data.train_batches(
        train, _cfg(decode_scaling=False, decode="gpu"), seed=3, global_batch=4
    )
    assert isinstance(next(iter(stream))["image"], jax.Array)  # decoded and augmented on the device
    stream.close()
    gpu_batches = _gpu_batches(train, _cfg(decode_scaling=False, decode="gpu"))
    assert len(host_batches) == len(gpu_batches) == 4
    diffs = []
    for a, b in zip(host_batches, gpu_batches, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        for key in ("label", "mask", "bad"):
            np.testing.assert_array_equal(a[key], b[key])
        diffs.append(np.abs(a["image"].astype(float) - b["image"]).mean())
    assert np.mean(diffs) < 1.0, diffs


def test_gpu_batches_without_randaugment_equal_host_crops(jpeg_folder):
    """Crops and flips only: the same boxes and flips, pixels within the resize tolerance."""
    train, _ = data.image_folder(jpeg_folder)
    cfg = _cfg(decode_scaling=False, randaugment=None)
    a = np.concatenate([b["image"] for b in data.train_batches(train, cfg, seed=3, global_batch=4)])
    g = _gpu_batches(train, _cfg(decode_scaling=False, randaugment=None, decode="gpu"))
    b = np.concatenate([x["image"] for x in g])
    diff = np.abs(a.astype(float) - b)
    assert diff.mean() < 0.25 and diff.max() <= 8


def test_gpu_batches_are_deterministic_and_resume_exactly(jpeg_folder):
    train, _ = data.image_folder(jpeg_folder)
    cfg = _cfg(decode="gpu")
    whole = _gpu_batches(train, cfg, epochs=2)
    again = _gpu_batches(train, cfg, epochs=2)
    resumed = _gpu_batches(train, cfg, epochs=2, start_step=5)
    assert len(whole) == 8
    for a, b in zip(whole, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for a, b in zip(whole[5:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    workers = _gpu_batches(train, _cfg(decode="gpu", workers=1))
    for a, b in zip(whole[:4], workers, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def _corrupt(path) -> None:
    """A JPEG whose header reads but whose body does not decode."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def test_gpu_path_bad_image_error_names_it(jpeg_folder):
    train, _ = data.image_folder(jpeg_folder)
    bad_file = jpeg_folder / "train" / "a" / "3.jpg"
    _corrupt(bad_file)
    with pytest.raises(data.BadImageError, match=f"cannot decode image {bad_file}"):
        for batch in _gpu_batches(train, _cfg(decode="gpu")):
            data.take_bad(batch, train, "error")


def test_gpu_path_bad_image_skip_matches_the_host_path(jpeg_folder):
    """Truncated body (found at decode) and unreadable header (found in the worker): the same
    substitutes and labels, reported the same, as on the host path."""
    train, _ = data.image_folder(jpeg_folder)
    _corrupt(jpeg_folder / "train" / "a" / "3.jpg")
    (jpeg_folder / "train" / "b" / "5.jpg").write_bytes(b"not a jpeg")
    cfg = _cfg(decode_scaling=False, randaugment=None, bad_images="skip")
    host_batches = list(data.train_batches(train, cfg, seed=3, global_batch=4))
    gpu_batches = _gpu_batches(
        train, _cfg(decode_scaling=False, randaugment=None, bad_images="skip", decode="gpu")
    )
    host_bad = [i for b in host_batches for i in data.take_bad(b, train, "skip")]
    gpu_bad = [i for b in gpu_batches for i in data.take_bad(b, train, "skip")]
    assert sorted(host_bad) == sorted(gpu_bad) == [3, 13]
    for a, b in zip(host_batches, gpu_batches, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        assert np.abs(a["image"].astype(float) - b["image"]).mean() < 0.25


def test_gpu_path_warns_and_falls_back_without_nvimgcodec(jpeg_folder, caplog):
    train, _ = data.image_folder(jpeg_folder)
    with caplog.at_level(logging.WARNING, logger="deit"):
        stage = gpu.DeviceStage(_cfg(decode="gpu"), train, train.name)
    assert isinstance(stage.decoder, gpu.HostDecoder)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "nvImageCodec is not installed" in line and "decoded on the host (simplejpeg)" in line


def test_gpu_path_on_decoded_arrays_takes_the_host_path(caplog):
    source = data.arrays(np.zeros((8, 12, 10, 3), np.uint8), np.arange(8) % 2)
    with caplog.at_level(logging.WARNING, logger="deit"):
        batches = list(
            data.train_batches(source, _cfg(decode="gpu", img_size=8), seed=0, global_batch=4)
        )
    assert batches[0]["image"].shape == (4, 8, 8, 3)
    assert "take the host path" in caplog.text


def test_gpu_path_config_checks():
    with pytest.raises(ValueError, match="decode 'tpu'"):
        data.DataConfig(decode="tpu")
    with pytest.raises(ValueError, match=r"with data\.decode gpu"):
        gpu.check_config(_cfg(decode="gpu", interpolation="lanczos"))


def test_buckets():
    assert gpu.bucket(1) == 256 and gpu.bucket(500) == 512 and gpu.bucket(513) == 768
    assert gpu.bucket(9000) == 9216


@pytest.mark.slow
def test_deit_train_on_the_gpu_path_meets_bad_images(jpeg_folder, tmp_path, capsys):
    """`deit train --data.decode gpu` end to end on the CPU: a truncated JPEG stops the run with
    the host path's one-line error, and under `--bad-images skip` the run completes."""
    from deit import cli

    _corrupt(jpeg_folder / "train" / "a" / "3.jpg")
    args = ["train", "--data", str(jpeg_folder), "--model", "deit_test_patch4_32"]
    args += ["--recipe", "imagenet", "--img-size", "16", "--distillation", "none", "--epochs", "1"]
    args += ["--workers", "0", "--batch-size", "8", "--data.decode", "gpu", "--data.repeats", "1"]
    args += ["--progress", "none"]
    assert cli.main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deit train: error: cannot decode image ") and "3.jpg" in err
    assert cli.main([*args, "--output", str(tmp_path / "b"), "--bad-images", "skip"]) == 0
