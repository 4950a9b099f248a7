"""Class names of an exported model, for `predict`, `visualize` and evaluation reports: the
run's own (its training folders' names, `config.json` "classes"), ImageNet-1k's for converted
ImageNet weights, else the class numbers.

A model predicts ImageNet-1k's classes (`is_imagenet`) when its `config.json` names no classes of
its own, it has 1000 outputs, and the folder is converted weights: `deit convert` (and so every
pretrained name, `deit.pretrained`) writes `"dataset": "imagenet-1k"` for a 1000-class head, since
the official, timm and Hugging Face DeiT classifiers are all ImageNet-1k ones; folders converted
before that carry only `"source"` (the file they came from), which counts too.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

IMAGENET = "imagenet-1k"
IMAGENET_CLASSES = 1000
# The synsets in class-index order with their WordNet lemmas; the file's header says where from.
IMAGENET_FILE = Path(__file__).with_name("imagenet_classes.txt")


@functools.cache
def imagenet_synsets() -> list[tuple[str, str]]:
    """`(synset id, lemmas)` of the 1000 ImageNet-1k classes, by class index
    (`("n01440764", "tench, Tinca tinca")` first)."""
    lines = IMAGENET_FILE.read_text(encoding="utf-8").splitlines()
    rows = [tuple(line.split("\t", 1)) for line in lines if line and not line.startswith("#")]
    return [(synset, lemmas) for synset, lemmas in rows]


def imagenet_classes() -> list[str]:
    """The short name (first lemma) of each ImageNet-1k class: `tench`, `goldfish`, ..."""
    return [lemmas.split(",")[0] for _, lemmas in imagenet_synsets()]


def is_imagenet(config: dict[str, Any], num_classes: int) -> bool:
    """Whether an exported folder's model predicts ImageNet-1k's classes (see the module)."""
    if config.get("classes") or num_classes != IMAGENET_CLASSES:
        return False
    return config.get("dataset") == IMAGENET or "source" in config


def class_names(config: dict[str, Any], num_classes: int) -> list[str]:
    """The name of each of an exported model's `num_classes` outputs (see the module)."""
    if config.get("classes"):
        return list(config["classes"])
    if is_imagenet(config, num_classes):
        return imagenet_classes()
    return [str(i) for i in range(num_classes)]
