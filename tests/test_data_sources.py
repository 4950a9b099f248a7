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
