import logging

import numpy as np
import pytest
from PIL import Image

from deit import data


def small_cfg(**kw) -> data.DataConfig:
    base = dict(img_size=16, scale=(0.5, 1.0), randaugment="rand-m9-mstd0.5-inc1", workers=0)
    return data.DataConfig(**{**base, **kw})


def random_source(n: int, classes: int = 4, seed: int = 0) -> data.Source:
    pixels = np.random.default_rng(seed).integers(0, 255, (n, 12, 10, 3), dtype=np.uint8)
    return data.arrays(pixels, np.arange(n) % classes)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple):
            assert x[:2] == y[:2]
            x, y = x[2], y[2]
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("repeats", [2, 3, 4])
def test_repeats_land_on_different_devices_at_any_batch(repeats):
    """Every batch size, every device count that divides it and is at least `repeats`."""
    for batch in [*range(1, 61), 96, 768, 1000, 1024]:
        order = data.epoch_order(4 * batch, 0, 0, batch, repeats)
        for devices in range(repeats, batch + 1):
            if batch % devices:
                continue
            shards = order.reshape(len(order), devices, batch // devices)
            for step in shards:
                for shard in step:
                    assert len(set(shard)) == len(shard), (batch, devices, shard)


def test_epoch_order_keeps_every_copy_and_changes_per_epoch():
    order = data.epoch_order(96, epoch=0, seed=0, global_batch=12, repeats=3)
    assert order.shape == (8, 12)
    values, counts = np.unique(order, return_counts=True)
    assert counts.max() == 3 and len(values) == 32
    assert not np.array_equal(order, data.epoch_order(96, 1, 0, 12, 3))
    np.testing.assert_array_equal(order, data.epoch_order(96, 0, 0, 12, 3))


def test_epoch_order_rejects_batch_larger_than_data():
    with pytest.raises(ValueError, match="fewer than the global batch 64"):
        data.epoch_order(10, 0, 0, 64, 1)


def test_plan_orders_train_then_eval_per_epoch():
    plan = data.Plan(train_size=40, val_size=10, global_batch=8, epochs=2)
    assert (plan.steps_per_epoch, plan.eval_steps, len(plan)) == (5, 2, 14)
    kinds = [plan.element(k) for k in range(len(plan))]
    assert kinds[:7] == [("train", 0, j) for j in range(5)] + [("eval", 0, 0), ("eval", 0, 1)]
    assert kinds[7] == ("train", 1, 0)
    assert [plan.position(s) for s in (0, 4, 5, 9, 10)] == [0, 4, 7, 11, 14]


def test_train_batches_deterministic_and_resumable_across_epochs():
    src = random_source(40)
    cfg = small_cfg(repeats=1)
    kw = dict(seed=3, global_batch=8, epochs=2)
    full = list(data.train_batches(src, cfg, **kw))
    assert len(full) == 10
    assert full[0]["image"].shape == (8, 16, 16, 3) and full[0]["image"].dtype == np.uint8
    assert_same_batches(full, list(data.train_batches(src, cfg, **kw)))
    assert_same_batches(full[7:], list(data.train_batches(src, cfg, **kw, start_step=7)))
    # Another epoch, another order and other augmentations.
    assert not np.array_equal(full[0]["image"], full[5]["image"])


def test_workers_give_the_batches_of_no_workers():
    train, val = random_source(48), random_source(20, seed=1)
    kw = dict(seed=0, global_batch=8, epochs=2, start_step=3)
    base = list(data.run_batches(train, val, small_cfg(repeats=3), **kw))
    assert [k for k, _, _ in base].count("eval") == 2 * 3
    for workers in (1, 2):
        assert_same_batches(
            base, list(data.run_batches(train, val, small_cfg(workers=workers), **kw))
        )


def test_process_shares_are_disjoint_and_cover_the_batch():
    src = data.arrays(np.zeros((48, 8, 8, 3), np.uint8), np.arange(48) % 3)
    cfg = small_cfg(repeats=1, randaugment=None)
    whole = data.epoch_order(48, 0, 1, 12, 1)
    shares = [
        list(
            data.train_batches(src, cfg, seed=1, global_batch=12, process_index=p, process_count=2)
        )
        for p in range(2)
    ]
    for step in range(4):
        labels = np.concatenate([shares[p][step]["label"] for p in range(2)])
        np.testing.assert_array_equal(labels, src.labels[whole[step]])


def test_eval_batches_cover_everything_once_with_mask():
    src = data.arrays(np.zeros((10, 8, 8, 3), np.uint8), np.arange(10) % 2)
    batches = list(data.eval_batches(src, small_cfg(), global_batch=4))
    assert len(batches) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 10 and mask[-2:].sum() == 0
    assert batches[0]["image"].shape == (4, 16, 16, 3)
    assert all((b["bad"] == -1).all() for b in batches)


def folder_with_a_bad_image(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    (root / "train" / "cat" / "1.png").write_bytes(b"not a png")
    (root / "val" / "dog" / "2.png").write_bytes(b"")
    return root


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DEIT_HOME", str(tmp_path / "home"))
    return folder_with_a_bad_image(tmp_path / "data")


def test_bad_image_error_names_the_file_when_read(bad_folder):
    train, _ = data.image_folder(bad_folder)
    cfg = small_cfg(repeats=1)
    bad_file = bad_folder / "train" / "cat" / "1.png"
    with pytest.raises(data.BadImageError, match=f"cannot decode image {bad_file}: ") as err:
        for batch in data.train_batches(train, cfg, seed=0, global_batch=4):
            data.take_bad(batch, train, "error")
    assert (
        "bad_images='skip'" in str(err.value)
        and "stopped where it was read" in str(err.value)
        and "\n" not in str(err.value)
    )


def test_bad_image_skip_uses_the_next_readable_record(bad_folder):
    train, val = data.image_folder(bad_folder)
    # Whole-image crops, no flip, no RandAugment: each record always gives the same pixels.
    cfg = small_cfg(repeats=1, randaugment=None, bad_images="skip", scale=(1.0, 1.0))
    cfg = data.DataConfig(**{**cfg.__dict__, "ratio": (1.0, 1.0), "hflip": 0.0})
    batches = list(data.train_batches(train, cfg, seed=0, global_batch=4))
    order = data.epoch_order(len(train), 0, 0, 4, 1).ravel()
    assert_same_batches(batches, list(data.train_batches(train, cfg, seed=0, global_batch=4)))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    skipped = [i for b in batches for i in data.take_bad(b, train, "skip")]
    assert skipped == [1]  # train/cat/1.png
    at_bad, at_next = int(np.flatnonzero(order == 1)[0]), int(np.flatnonzero(order == 2)[0])
    np.testing.assert_array_equal(images[at_bad], images[at_next])  # cat/2.png stands in
    assert labels[at_bad] == labels[at_next] == 0
    evals = list(data.eval_batches(val, cfg, global_batch=4))
    mask = np.concatenate([b["mask"] for b in evals])
    bad = np.concatenate([b["bad"] for b in evals])
    assert mask.sum() == 7 and list(bad[bad >= 0]) == [6]  # val/dog/2.png is record 6


def test_check_images_lists_every_unreadable_file(bad_folder, caplog):
    with caplog.at_level(logging.INFO, logger="deit"):
        bad = data.check_images(bad_folder, workers=1, progress=False)
    assert sorted(name for name, _ in bad) == [
        str(bad_folder / "train" / "cat" / "1.png"),
        str(bad_folder / "val" / "dog" / "2.png"),
    ]
    assert all(reason for _, reason in bad)


def test_config_validation():
    with pytest.raises(ValueError, match="bad_images 'maybe'"):
        data.DataConfig(bad_images="maybe")
    with pytest.raises(ValueError, match="workers -1; expected 0"):
        data.DataConfig(workers=-1)
    with pytest.raises(ValueError, match=r"workers 100000; expected 0 .* per usable core"):
        data.DataConfig(workers=100000)
    with pytest.raises(ValueError):
        data.DataConfig(randaugment="rand-q9")
    assert data.DataConfig().num_workers == data.usable_cores()


def test_training_from_files_gives_the_batches_of_their_decoded_arrays(tmp_path):
    """JPEG files take the encoded path (crop drawn from the header, `train_transform_encoded`),
    arrays the array path; where no DCT scaling applies their batches are bit-identical."""
    from deit.transforms import decode_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    labels, classes = np.arange(12) % 3, ["a", "b", "c"]
    files = data.Source([str(p) for p in paths], labels, classes)
    arrays = data.Source([decode_image(p) for p in paths], labels, classes)
    kw = dict(seed=1, global_batch=4, epochs=2)
    for cfg in (
        small_cfg(repeats=1, img_size=24, scale=(0.08, 1.0)),  # crops < 48 px: never scaled
        small_cfg(repeats=1, img_size=8, decode_scaling=False),
    ):
        from_files = list(data.train_batches(files, cfg, **kw))
        assert_same_batches(from_files, list(data.train_batches(arrays, cfg, **kw)))
    scaled = small_cfg(repeats=1, img_size=8, scale=(0.9, 1.0))  # crops of 38+ px: 1/4 size
    a = list(data.train_batches(files, scaled, **kw))
    b = list(data.train_batches(arrays, scaled, **kw))
    assert all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
