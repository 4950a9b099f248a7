import numpy as np
import pytest
from PIL import Image

from deit import data


def small_cfg(**kw) -> data.DataConfig:
    base = dict(img_size=16, scale=(0.5, 1.0), randaugment="rand-m9-mstd0.5-inc1", workers=0)
    return data.DataConfig(**{**base, **kw})


def test_digits_split_is_fixed_and_stratified():
    train, val = data.digits()
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(i) for i in range(10)]
    assert train.load(0).shape == (8, 8, 3) and train.load(0).dtype == np.uint8
    counts = np.bincount(val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174-183 per class)
    again, _ = data.digits()
    np.testing.assert_array_equal(train.labels, again.labels)


def test_epoch_order_repeats_land_on_different_devices():
    order = data.epoch_order(96, epoch=0, seed=0, global_batch=12, repeats=3)
    assert order.shape == (8, 12)
    for devices in (3, 4, 6, 12):
        shards = order.reshape(8, devices, 12 // devices)  # contiguous shard per device
        for step in range(8):
            for d in range(devices):
                # No device holds two copies of one image.
                assert len(set(shards[step, d])) == 12 // devices
    values, counts = np.unique(order, return_counts=True)
    assert counts.max() == 3 and len(values) == 32
    # Another epoch, another order; the same epoch, the same order.
    assert not np.array_equal(order, data.epoch_order(96, 1, 0, 12, 3))
    np.testing.assert_array_equal(order, data.epoch_order(96, 0, 0, 12, 3))


def test_epoch_order_rejects_batch_larger_than_data():
    with pytest.raises(ValueError, match="fewer than the global batch 64"):
        data.epoch_order(10, 0, 0, 64, 1)


def test_train_batches_deterministic_and_resumable():
    src = data.arrays(
        np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 4
    )
    cfg = small_cfg(repeats=1)
    kw = dict(seed=3, epoch=1, global_batch=8)
    full = list(data.train_batches(src, cfg, **kw))
    assert len(full) == 5
    assert full[0]["image"].shape == (8, 16, 16, 3) and full[0]["image"].dtype == np.uint8
    again = list(data.train_batches(src, cfg, **kw))
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    resumed = list(data.train_batches(src, cfg, **kw, start_step=3))
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0]["image"], full[3]["image"])
    np.testing.assert_array_equal(resumed[1]["label"], full[4]["label"])


def test_process_shares_are_disjoint_and_cover_the_batch():
    src = data.arrays(np.zeros((48, 8, 8, 3), np.uint8), np.arange(48) % 3)
    cfg = small_cfg(repeats=1, randaugment=None)
    whole = data.epoch_order(48, 0, 1, 12, 1)
    shares = [
        list(
            data.train_batches(
                src,
                cfg,
                seed=1,
                epoch=0,
                global_batch=12,
                process_index=p,
                process_count=2,
            )
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


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 24)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "train" / "dog" / "grey.jpg")
    train, val = data.image_folder(root)
    assert train.classes == ["cat", "dog"] and len(train) == 7 and len(val) == 6
    assert train.load(6).shape == (5, 5, 3)  # dog/grey.jpg sorts last


def test_image_folder_errors(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be decoded: .*broken\.jpg"):
        data.image_folder(root)
    train, _ = data.image_folder(root, bad_images="skip")
    assert len(train) == 6
    (root / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match="only in val \\['bird'\\]"):
        data.image_folder(root, bad_images="skip")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no class folders"):
        data.image_folder(empty)
    with pytest.raises(ValueError, match="is not a folder"):
        data.image_folder(tmp_path / "missing")


def test_config_validation():
    with pytest.raises(ValueError, match="bad_images 'maybe'"):
        data.DataConfig(bad_images="maybe")
    with pytest.raises(ValueError):
        data.DataConfig(randaugment="rand-q9")
