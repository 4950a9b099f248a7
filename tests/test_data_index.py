"""The ImageFolder index: what it lists, what it refuses, when it is reused and when it is not."""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deit import data
from deit.data import index


@pytest.fixture(autouse=True)
def home(deit_home):
    return deit_home


def write_image(path: Path, seed: int, size: tuple[int, int] = (5, 4)) -> np.ndarray:
    """A random RGB image of `size` (H, W) at `path` (format from its suffix); its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 2) -> Path:
    """`root/{train,val}/<class>/<i>.png`."""
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", seed=100 * c + i)
    return root


def listing(source: data.FolderSource) -> list[str]:
    return [source.relative(i) for i in range(len(source))]


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "deit"]


def test_index_lists_images_as_imagefolder_does_ignoring_noise(tmp_path):
    root = tmp_path / "data"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    pixels = {
        "cat/1.png": write_image(cat / "1.png", 1, (5, 4)),
        "cat/0.png": write_image(cat / "0.png", 0, (6, 3)),
        "cat/sub/x.png": write_image(cat / "sub" / "x.png", 2, (7, 2)),  # nested: included
        "dog/2.png": write_image(dog / "2.png", 3, (3, 8)),
        "dog/0.png": write_image(dog / "0.png", 4, (4, 4)),
    }
    write_image(cat / "B.JPEG", 5, (8, 9))  # upper-case suffix: included (JPEG is lossy)
    write_image(cat / ".thumbs" / "t.png", 6)  # hidden folder
    write_image(cat / "._a.jpg", 7)  # hidden file (macOS resource fork)
    write_image(root / "train" / ".trash" / "y.png", 8)  # hidden class folder
    (cat / ".DS_Store").write_bytes(b"\0\1")
    (cat / "notes.txt").write_text("not an image")
    (dog / "labels.csv").write_text("file,label\n")
    (root / "train" / "README.txt").write_text("a file beside the class folders")
    for name in ("dog", "cat"):
        write_image(root / "val" / name / "0.png", 9)

    train, val = data.image_folder(root)
    assert train.classes == val.classes == ["cat", "dog"]
    assert len(train) == 6 and train.counts == [4, 2]
    assert listing(train) == [
        "cat/0.png",
        "cat/1.png",
        "cat/B.JPEG",
        "cat/sub/x.png",
        "dog/0.png",
        "dog/2.png",
    ]
    assert train.labels.dtype == np.int32
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 0, 1, 1])
    for i, rel in enumerate(listing(train)):
        assert train.name(i) == str(root.absolute() / "train" / rel)
        assert os.path.isabs(train.name(i))
        image = train.load(i)
        assert image.dtype == np.uint8
        if rel in pixels:
            np.testing.assert_array_equal(image, pixels[rel])
        else:
            assert image.shape == (8, 9, 3)
    assert (len(val), val.counts, listing(val)) == (2, [1, 1], ["cat/0.png", "dog/0.png"])
    np.testing.assert_array_equal(val.labels, [0, 1])


def test_empty_class_folders_are_refused(tmp_path):
    root = make_folder(tmp_path / "data")
    empty = root / "train" / "emu"
    empty.mkdir()
    (root / "val" / "emu").mkdir()
    write_image(root / "val" / "emu" / "0.png", 0)
    with pytest.raises(ValueError, match=re.escape(f"class folder {empty} holds no images;")):
        data.image_folder(root)
    # Only non-images (and hidden images) still count as empty.
    (empty / "notes.txt").write_text("x")
    write_image(empty / ".hidden.png", 0)
    write_image(empty / ".cache" / "0.png", 0)
    with pytest.raises(ValueError, match=re.escape(f"class folder {empty} holds no images;")):
        data.image_folder(root)


def test_layout_errors_name_the_folder(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "0.png").write_bytes(b"")  # files but no class folders
    (root / "train" / ".hidden").mkdir()
    train = root / "train"
    with pytest.raises(ValueError, match=re.escape(f"{train} has no class folders; expected")):
        data.image_folder(root)

    root = make_folder(tmp_path / "noval")
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "val").iterdir()):
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(ValueError, match=re.escape(f"{root / 'val'} is not a folder; expected")):
        data.image_folder(root)


def test_train_and_val_classes_must_match(tmp_path):
    root = make_folder(tmp_path / "data")
    write_image(root / "train" / "bird" / "0.png", 0)
    write_image(root / "val" / "fish" / "0.png", 0)
    write_image(root / "val" / "eel" / "0.png", 0)
    expected = "only in train ['bird'], only in val ['eel', 'fish']; expected the same classes"
    with pytest.raises(ValueError, match=re.escape(expected)):
        data.image_folder(root)


def test_second_start_reuses_the_index_without_scanning(tmp_path, home, caplog, monkeypatch):
    root = tmp_path / "data"
    for i in range(3):
        write_image(root / "train" / "cat" / f"{i}.png", i)
    write_image(root / "train" / "dog" / "0.png", 3)
    make_folder(root, per_class=1)
    with caplog.at_level(logging.INFO, logger="deit"):
        first = data.image_folder(root)
    train = root.absolute() / "train"
    val = root.absolute() / "val"
    assert messages(caplog) == [
        f"{train}: 2 classes, 4 images (1-3 per class; indexed): cat/0.png, cat/1.png ... "
        "cat/2.png, dog/0.png",
        f"{val}: 2 classes, 2 images (1-1 per class; indexed): cat/0.png, dog/0.png",
    ]
    # One index folder per split, named by a hash of the split folder's real path.
    folders = sorted((home / "index").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"[0-9a-f]{20}", f.name) for f in folders)
    assert all((f / "meta.json").is_file() for f in folders)

    def no_scan(path):
        raise AssertionError(f"{path} scanned again")

    monkeypatch.setattr(index, "_scan_class", no_scan)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit"):
        second = data.image_folder(root)
    assert messages(caplog) == [
        f"{train}: 2 classes, 4 images (1-3 per class; index reused): cat/0.png, cat/1.png ... "
        "cat/2.png, dog/0.png",
        f"{val}: 2 classes, 2 images (1-1 per class; index reused): cat/0.png, dog/0.png",
    ]
    for a, b in zip(first, second, strict=True):
        assert listing(a) == listing(b) and a.counts == b.counts
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.load(len(a) - 1), b.load(len(b) - 1))


CAT = ["cat/0.png", "cat/1.png", "cat/sub/x.png"]
DOG = ["dog/0.png", "dog/1.png"]


def _add_file(root: Path) -> list[Path]:
    write_image(root / "train" / "cat" / "0a.png", 50)
    return [root / "train" / "cat"]


def _remove_file(root: Path) -> list[Path]:
    (root / "train" / "cat" / "1.png").unlink()
    return [root / "train" / "cat"]


def _rename_file(root: Path) -> list[Path]:
    (root / "train" / "dog" / "0.png").rename(root / "train" / "dog" / "9.png")
    return [root / "train" / "dog"]


def _add_class(root: Path) -> list[Path]:
    write_image(root / "train" / "bee" / "0.png", 51)
    write_image(root / "val" / "bee" / "0.png", 52)
    return [root / "train", root / "val"]


def _add_nested_file(root: Path) -> list[Path]:
    write_image(root / "train" / "cat" / "sub" / "y.png", 53)  # into the existing sub/
    return [root / "train" / "cat" / "sub"]


def _add_nested_folder(root: Path) -> list[Path]:
    write_image(root / "train" / "dog" / "new" / "deep" / "z.png", 54)
    return [root / "train" / "dog"]


# change -> (edit, which returns the existing folders it changes; train listing afterwards)
CHANGES = {
    "add file": (_add_file, ["cat/0.png", "cat/0a.png", *CAT[1:], *DOG]),
    "remove file": (_remove_file, ["cat/0.png", "cat/sub/x.png", *DOG]),
    "rename file": (_rename_file, [*CAT, "dog/1.png", "dog/9.png"]),
    "add class": (_add_class, ["bee/0.png", *CAT, *DOG]),
    "add nested file": (_add_nested_file, [*CAT, "cat/sub/y.png", *DOG]),
    "add nested folder": (_add_nested_folder, [*CAT, *DOG, "dog/new/deep/z.png"]),
}


def _stamp(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_mtime_ns, st.st_size


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_reindexes_and_is_never_stale(tmp_path, caplog, change):
    root = make_folder(tmp_path / "data", per_class=2)
    write_image(root / "train" / "cat" / "sub" / "x.png", 40)
    train, _ = data.image_folder(root)
    assert listing(train) == CAT + DOG
    edit, expected = CHANGES[change]
    folders = [root / "train", root / "val", *(root / "train").rglob("*")]
    before = {p: _stamp(p) for p in folders if p.is_dir()}
    for folder in edit(root):
        if _stamp(folder) == before[folder]:
            # Never taken on this machine (ext4 on Linux 6.18: multigrain timestamps give a
            # change after a stat a new mtime). Coarse timestamps (FAT's 2 s, older kernels' clock
            # tick) can leave (mtime, size) as the index saw them when the change lands in the
            # same tick; move the time on so the test checks invalidation, not the clock.
            t = before[folder][0] + 10**9
            os.utime(folder, ns=(t, t))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit"):
        train, val = data.image_folder(root)
    changed = ["train", "val"] if change == "add class" else ["train"]
    assert [m for m in messages(caplog) if m.startswith("note: ")] == [
        f"note: {root.absolute() / s} changed since its index was written; indexing it again"
        for s in changed
    ]
    val_note = "indexed" if change == "add class" else "index reused"
    assert f"; {val_note}): " in messages(caplog)[-1]
    classes = ["bee", "cat", "dog"] if change == "add class" else ["cat", "dog"]
    assert train.classes == val.classes == classes
    assert listing(train) == expected
    counts = [sum(f.startswith(f"{c}/") for f in expected) for c in classes]
    assert train.counts == counts
    np.testing.assert_array_equal(train.labels, np.repeat(np.arange(len(classes)), counts))
    for i in range(len(train)):
        assert train.load(i).shape[-1] == 3  # every listed file is there
    # The rewritten index is the one the next start reuses.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit"):
        again, _ = data.image_folder(root)
    assert not [m for m in messages(caplog) if m.startswith("note: ")]
    assert "index reused" in messages(caplog)[0]
    assert listing(again) == expected


def test_sources_pickle_small_whatever_the_file_count(tmp_path):
    sizes = {}
    for name, per_class in (("a", 10), ("b", 100)):
        root = make_folder(tmp_path / name, per_class=per_class)
        train, _ = data.image_folder(root)
        assert len(train) == 2 * per_class
        train.labels, train.relative(0)  # open the memory-mapped arrays before pickling
        blob = pickle.dumps(train)
        sizes[name] = len(blob)
        copy = pickle.loads(blob)
        assert copy.classes == train.classes and copy.counts == train.counts
        np.testing.assert_array_equal(copy.labels, train.labels)
        for i in range(len(train)):
            assert copy.name(i) == train.name(i)
            np.testing.assert_array_equal(copy.load(i), train.load(i))
    assert sizes["a"] < 2048
    assert sizes["a"] == sizes["b"]  # same-length paths: the file count adds nothing


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_unwritable_cache_is_one_line_naming_deit_home(tmp_path, monkeypatch, where):
    root = make_folder(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    home = blocker if where == "file" else blocker / "deit"
    monkeypatch.setenv("DEIT_HOME", str(home))
    with pytest.raises(ValueError) as err:
        data.image_folder(root)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(
        re.escape(f"cannot write the folder index in {home}/index/")
        + r"[0-9a-f]{20} \(Not a directory\); expected a writable cache folder: set DEIT_HOME "
        "to one",
        message,
    ), message


def test_a_folder_changed_within_the_margin_of_the_scan_is_scanned_again(
    tmp_path, monkeypatch, caplog
):
    """A file added in the same clock tick as the scan must not be missed: folders younger than
    the margin before the scan count as changed until they are older."""
    monkeypatch.setattr(index, "RACY_MARGIN_NS", 2_000_000_000)
    root = make_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="deit"):
        data.image_folder(root)
        data.image_folder(root)  # the folders are seconds old: not trusted yet
        past = time.time_ns() - 10_000_000_000
        for folder in [root / "train", *(root / "train").iterdir()]:
            os.utime(folder, ns=(past, past))
        data.image_folder(root)  # rescans once more (the stamps changed) and records them
        data.image_folder(root)
    train_lines = [r.message for r in caplog.records if "/train:" in r.message]
    assert ["index reused" in m for m in train_lines] == [False, False, False, True]
