"""Packed shards: the same records, pixels and batches as the folder they were packed from, and
what a broken or unfinished shard set says."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deit import data
from deit.data import shards

CLASSES = ["cat", "dog"]


@pytest.fixture(autouse=True)
def home(deit_home):
    return deit_home


def write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rng.integers(12, 25, 2)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """8 train images (4 per class, one nested, one with a non-ASCII name), 6 val images, all
    of different sizes."""
    root, rng = tmp_path / "data", np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 3)):
        for name in CLASSES:
            for i in range(per_class - 1):
                write_image(root / split / name / f"{i}.png", rng)
            last = "sub/x.png" if name == "cat" else "chién ☃.png"
            write_image(root / split / name / last, rng)
    return root


def shard_files(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.array_record" for i in range(count)]


LABELS = ["train-labels.npy", "val-labels.npy"]
PACKED = sorted([*shard_files("train", 3), *shard_files("val", 2), "shards.json", *LABELS])


def assert_same_records(a, b) -> None:
    """Folder source `a` and shard source `b`: classes, labels, names and pixels."""
    assert a.classes == b.classes == CLASSES
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    for i in range(len(a)):
        label, name, raw = b.record(i)
        assert (label, name) == (int(a.labels[i]), a.relative(i))
        assert raw == a.read_bytes(i)  # the original file, unchanged
        np.testing.assert_array_equal(b.load(i), a.load(i))


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"image", "label", "mask", "bad"}
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


def test_shards_hold_the_folder_record_for_record(folder, tmp_path, caplog):
    out = tmp_path / "packed"
    assert shards.pack(folder, out, records_per_shard=3, progress=False) == out.absolute()
    assert sorted(p.name for p in out.iterdir()) == PACKED  # no marker, no temporary files
    manifest = json.loads((out / "shards.json").read_text())
    assert [s["records"] for s in manifest["splits"]["train"]["shards"]] == [3, 3, 2]
    assert [s["records"] for s in manifest["splits"]["val"]["shards"]] == [3, 3]
    with caplog.at_level(logging.INFO, logger="deit"):
        train, val = data.open_shards(out)
    assert [r.getMessage() for r in caplog.records if r.name == "deit"] == [
        f"{out} [train]: 2 classes, 8 images (4-4 per class) in 3 shard(s)",
        f"{out} [val]: 2 classes, 6 images (3-3 per class) in 2 shard(s)",
    ]
    f_train, f_val = data.image_folder(folder)
    assert f_train.relative(7) == "dog/chién ☃.png" and f_train.relative(3) == "cat/sub/x.png"
    assert_same_records(f_train, train)
    assert_same_records(f_val, val)
    assert train.name(7) == f"{out}/train[7] (dog/chién ☃.png)"
    copy = pickle.loads(pickle.dumps(train))  # as a worker process gets it: paths, no reader
    assert len(pickle.dumps(train)) < 2048
    np.testing.assert_array_equal(copy.load(5), train.load(5))

    loaded = data.load_sources(data.DataConfig(dataset=str(out)))
    assert all(isinstance(s, data.ShardSource) for s in loaded)
    assert [len(s) for s in loaded] == [8, 6]


def test_batches_from_shards_equal_batches_from_the_folder(folder, tmp_path):
    out = shards.pack(folder, tmp_path / "packed", records_per_shard=3, progress=False)
    kw = dict(img_size=16, workers=0, repeats=3, randaugment="rand-m9-mstd0.5-inc1")
    cfg = data.DataConfig(dataset=str(out), **kw)
    from_shards = data.load_sources(cfg)
    from_folder = data.load_sources(data.DataConfig(dataset=str(folder), **kw))
    assert isinstance(from_folder[0], data.FolderSource)
    trains = [
        list(data.train_batches(s[0], cfg, seed=5, global_batch=4, epochs=2))
        for s in (from_folder, from_shards)
    ]
    assert len(trains[0]) == 4 and trains[0][0]["image"].shape == (4, 16, 16, 3)
    assert_same_batches(*trains)
    evals = [list(data.eval_batches(s[1], cfg, global_batch=4)) for s in (from_folder, from_shards)]
    assert len(evals[0]) == 2  # 6 images, padded to 8
    np.testing.assert_array_equal(evals[0][1]["mask"], [1, 1, 0, 0])
    assert_same_batches(*evals)
    runs = [
        list(data.run_batches(*s, cfg, seed=2, global_batch=4, epochs=2))
        for s in (from_folder, from_shards)
    ]
    assert [(kind, epoch) for kind, epoch, _ in runs[0]] == [
        ("train", 0), ("train", 0), ("eval", 0), ("eval", 0),
        ("train", 1), ("train", 1), ("eval", 1), ("eval", 1),
    ]  # fmt: skip
    assert [k for k, _, _ in runs[0]] == [k for k, _, _ in runs[1]]
    assert_same_batches([b for _, _, b in runs[0]], [b for _, _, b in runs[1]])


def test_a_worker_process_reads_shards_as_this_process_does(folder, tmp_path):
    out = shards.pack(folder, tmp_path / "packed", records_per_shard=3, progress=False)
    train, val = data.open_shards(out)
    kw = dict(img_size=16, repeats=3, randaugment="rand-m9-mstd0.5-inc1")
    run = dict(seed=1, global_batch=4, epochs=1)
    batches = [
        list(data.run_batches(train, val, data.DataConfig(workers=w, **kw), **run)) for w in (0, 1)
    ]
    assert [(k, e) for k, e, _ in batches[1]] == [("train", 0)] * 2 + [("eval", 0)] * 2
    assert_same_batches([b for *_, b in batches[0]], [b for *_, b in batches[1]])


@pytest.mark.parametrize(
    "name",
    ["cat/0.png", "猫/naïve chién ☃.JPEG", "dog/\udcff\udcfe.png", ""],
    ids=["ascii", "unicode", "undecodable bytes", "empty"],
)
def test_record_round_trip(name):
    data_bytes = bytes(range(256)) * 3
    for label in (0, 999, 2**31 - 1):
        record = shards.encode_record(label, name, data_bytes)
        assert shards.decode_record(record) == (label, name, data_bytes)
    assert shards.decode_record(shards.encode_record(3, name, b"")) == (3, name, b"")


def test_pack_refuses_a_folder_that_is_not_empty(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("keep me")
    expected = f"{out} is not empty; expected a new or empty folder"
    with pytest.raises(ValueError, match=re.escape(expected)):
        shards.pack(folder, out, records_per_shard=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]
    # A finished pack is not continued either, nor packed over with other settings.
    done = shards.pack(folder, tmp_path / "done", records_per_shard=3, progress=False)
    for per in (3, 4):
        with pytest.raises(ValueError, match=re.escape(f"{done} is not empty;")):
            shards.pack(folder, done, records_per_shard=per, progress=False)
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    shards.pack(folder, tmp_path / "empty", records_per_shard=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == PACKED


def test_missing_or_truncated_shards_are_refused(folder, tmp_path):
    out = shards.pack(folder, tmp_path / "packed", records_per_shard=3, progress=False)
    cfg = data.DataConfig(dataset=str(out))
    shard = out / "val-00001-of-00002.array_record"
    whole = shard.read_bytes()
    shard.unlink()
    expected = f"shard {shard} is missing; expected the 2 val shards listed in shards.json"
    for load in (lambda: data.open_shards(out), lambda: data.load_sources(cfg)):
        with pytest.raises(ValueError, match=re.escape(expected)):
            load()
    shard.write_bytes(whole[: len(whole) // 2])
    expected = (
        f"shard {shard} is {len(whole) // 2:,} bytes; expected {len(whole):,} (truncated or "
        "changed since it was packed)"
    )
    for load in (lambda: data.open_shards(out), lambda: data.load_sources(cfg)):
        with pytest.raises(ValueError, match=re.escape(expected)):
            load()


def test_an_unfinished_pack_is_refused_then_continued(folder, tmp_path, monkeypatch, caplog):
    out = tmp_path / "packed"
    real = shards._write_shard
    calls: list[str] = []

    def failing(source, lo, hi, path, done):
        calls.append(path.name)
        if len(calls) == 1:
            return real(source, lo, hi, path, done)
        if len(calls) == 2:  # dies part-way through, leaving its temporary file

            def full_disk(k):
                raise OSError(28, "No space left on device")

            return real(source, lo, hi, path, full_disk)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m, pytest.raises(OSError, match="No space left on device"):
        m.setattr(shards, "_write_shard", failing)
        shards.pack(folder, out, records_per_shard=3, threads=1, progress=False)
    assert calls == [*shard_files("train", 3), *shard_files("val", 2)]
    first = out / "train-00000-of-00003.array_record"
    left = sorted(p.name for p in out.glob("*.array_record*"))
    assert left == [first.name, "train-00001-of-00003.array_record.tmp"]
    assert not (out / "shards.json").exists()
    expected = f"{out} holds an unfinished pack (no shards.json); run the same deit data pack"
    cfg = data.DataConfig(dataset=str(out))
    for load in (lambda: data.open_shards(out), lambda: data.load_sources(cfg)):
        with pytest.raises(ValueError, match=re.escape(expected)):
            load()
    with pytest.raises(ValueError, match=re.escape(f"{out} is not empty;")):  # other settings
        shards.pack(folder, out, records_per_shard=4, progress=False)

    # An hour back: a rewrite (a new file renamed over it) could not keep this time or inode.
    kept = first.stat().st_mtime_ns - 3600 * 10**9
    os.utime(first, ns=(kept, kept))
    inode = first.stat().st_ino
    with caplog.at_level(logging.INFO, logger="deit"):
        shards.pack(folder, out, records_per_shard=3, progress=False)
    assert f"continuing the unfinished pack in {out}" in [r.getMessage() for r in caplog.records]
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == (kept, inode)
    assert sorted(p.name for p in out.iterdir()) == PACKED
    f_train, f_val = data.image_folder(folder)
    train, val = data.open_shards(out)
    assert_same_records(f_train, train)
    assert_same_records(f_val, val)


def test_a_corrupt_image_in_shards_names_shard_folder_index_and_file(folder, tmp_path):
    (folder / "train" / "dog" / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = shards.pack(folder, tmp_path / "packed", records_per_shard=3, progress=False)
    train, _ = data.open_shards(out)
    f_train, _ = data.image_folder(folder)
    i = [f_train.relative(k) for k in range(len(f_train))].index("dog/1b.png")
    assert i == 6
    expected = f"cannot decode image {out}/train[6] (dog/1b.png): "
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        train.load(i)
    assert "\n" not in str(err.value)
    np.testing.assert_array_equal(train.load(i - 1), f_train.load(i - 1))  # the rest reads
    np.testing.assert_array_equal(train.load(i + 1), f_train.load(i + 1))
