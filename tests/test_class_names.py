"""The ImageNet-1k class names shipped with the package, and which models they name."""

import pytest

from deit import class_names
from deit.class_names import IMAGENET_FILE, imagenet_classes, imagenet_synsets, is_imagenet


def test_the_file_holds_the_1000_classes_in_index_order():
    lines = [ln for ln in IMAGENET_FILE.read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 1000 and len(set(lines)) == 1000
    assert imagenet_synsets()[0] == ("n01440764", "tench, Tinca tinca")
    assert imagenet_classes()[:2] == ["tench", "goldfish"]
    assert imagenet_classes()[999] == "toilet tissue"


def test_the_names_are_timms():
    timm_data = pytest.importorskip("timm.data")
    info = timm_data.ImageNetInfo()
    assert [s for s, _ in imagenet_synsets()] == [info.index_to_label_name(i) for i in range(1000)]
    assert [n for _, n in imagenet_synsets()] == [info.index_to_description(i) for i in range(1000)]


@pytest.mark.parametrize(
    ("config", "num_classes", "first"),
    [
        ({"dataset": "imagenet-1k"}, 1000, "tench"),  # deit convert of an official head
        ({"source": "old.pth"}, 1000, "tench"),  # converted before the dataset key
        ({"classes": ["cat", "dog"]}, 2, "cat"),  # a run's own folders
        ({"classes": [str(i) for i in range(1000)], "dataset": "imagenet-1k"}, 1000, "0"),
        ({"dataset": "imagenet-1k"}, 10, "0"),  # not 1000 outputs: not ImageNet's
        ({}, 1000, "0"),  # a 1000-class model nobody said is ImageNet
    ],
)
def test_which_models_get_which_names(config, num_classes, first):
    names = class_names.class_names(config, num_classes)
    assert len(names) == num_classes and names[0] == first
    assert is_imagenet(config, num_classes) == (first == "tench")
