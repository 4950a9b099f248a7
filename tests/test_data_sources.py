import numpy as np
import pytest

from deit import data


def test_digits_split_is_fixed_and_stratified():
    train, val = data.digits()
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(i) for i in range(10)]
    assert train.load(0).shape == (8, 8, 3) and train.load(0).dtype == np.uint8
    counts = np.bincount(val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174-183 per class)
    again, _ = data.digits()
    np.testing.assert_array_equal(train.labels, again.labels)


def test_arrays_repeat_grey_to_rgb_and_check_shapes():
    src = data.arrays(np.zeros((4, 5, 6), np.uint8), [0, 1, 2, 1])
    assert src.load(3).shape == (5, 6, 3) and src.classes == ["0", "1", "2"]
    assert src.name(2) == "record 2"
    with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W, 3\)"):
        data.arrays(np.zeros((4, 5, 6, 3), np.float32), [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"labels have shape \(3,\); expected \(4,\)"):
        data.arrays(np.zeros((4, 5, 6), np.uint8), [0, 1, 2])


def test_synthetic_source_is_imagenet_shaped_and_refuses_bad_counts():
    from deit.data.sources import SYNTHETIC_POOL, SYNTHETIC_TRAIN, synthetic

    train, val = synthetic("synthetic", 24)
    assert (len(train), len(val)) == (SYNTHETIC_TRAIN, SYNTHETIC_TRAIN // 10)
    assert len(train.classes) == 1000 and train.labels[1001] == 1
    image = train.load(5)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8 and train.prepared
    np.testing.assert_array_equal(train.load(5 + SYNTHETIC_POOL), image)
    assert not np.array_equal(val.load(5), image)  # its own pool
    train, val = synthetic("synthetic:300", 8)
    assert (len(train), len(val)) == (300, 30)
    for bad in ("synthetic:0", "synthetic:ten"):
        with pytest.raises(ValueError, match=rf"data '{bad}'; expected 'synthetic' or"):
            synthetic(bad, 8)


def test_synthetic_batches_skip_the_per_image_work():
    """Prepared records reach the batch as they are (no crop, flip or RandAugment), in-process."""
    from deit.data.pipeline import load_sources, run_batches

    cfg = data.DataConfig(dataset="synthetic:64", img_size=16, workers=2)
    train, val = load_sources(cfg)
    with run_batches(train, val, cfg, seed=0, global_batch=8, epochs=1) as stream:
        kind, _, batch = next(stream)
        assert kind == "train" and batch["image"].shape == (8, 16, 16, 3)
        pool = {train.load(i).tobytes() for i in range(len(train))}
        assert all(image.tobytes() in pool for image in batch["image"])
