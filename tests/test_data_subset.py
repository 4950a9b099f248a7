"""The labelled fraction of a training split: class-balanced, fixed by its seed, nested across
fractions, and what a run's sources are under `label_fraction`."""

import pickle

import numpy as np
import pytest

from deit import data
from deit.data.subset import Subset, stratified_indices
from deit.errors import InputError


def test_each_class_keeps_its_share_and_at_least_one():
    labels = np.repeat(np.arange(4), [40, 40, 20, 3])
    keep = stratified_indices(labels, 0.25, seed=0)
    assert np.bincount(labels[keep]).tolist() == [10, 10, 5, 1]  # round(0.75) = 1, and >= 1
    assert len(np.unique(keep)) == len(keep) and np.all(np.diff(keep) > 0)
    tiny = stratified_indices(labels, 0.01, seed=0)
    assert np.bincount(labels[tiny]).tolist() == [1, 1, 1, 1]


def test_the_choice_is_fixed_by_the_seed_and_nested_across_fractions():
    labels = np.tile(np.arange(5), 30)
    a, b = stratified_indices(labels, 0.2, 7), stratified_indices(labels, 0.2, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stratified_indices(labels, 0.2, 8))
    bigger = stratified_indices(labels, 0.5, 7)
    assert set(a) <= set(bigger)
    assert np.array_equal(stratified_indices(labels, 1.0, 3), np.arange(len(labels)))


def test_one_class_pick_does_not_depend_on_the_others():
    labels = np.repeat(np.arange(3), 20)
    other = labels.copy()
    other[other == 2] = 1  # class 2 merged into 1: class 0's records and pick stay the same
    pick = lambda lab: [i for i in stratified_indices(lab, 0.3, 1) if lab[i] == 0]
    assert pick(labels) == pick(other)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(InputError, match="label_fraction"):
        data.DataConfig(label_fraction=fraction)
    with pytest.raises(InputError, match="label_fraction"):
        stratified_indices(np.zeros(4, int), fraction, 0)


def test_a_run_trains_on_the_subset_and_validates_on_everything():
    full_train, full_val = data.load_sources(data.DataConfig())
    train, val = data.load_sources(data.DataConfig(label_fraction=0.1, subset_seed=2))
    assert isinstance(train, Subset) and len(val) == len(full_val)
    counts = np.bincount(train.labels)
    assert counts.min() >= 14 and counts.max() <= 15 and len(train) == counts.sum()
    i = int(train.indices[5])
    assert np.array_equal(train.load(5), full_train.load(i))
    assert train.labels[5] == full_train.labels[i]
    again = pickle.loads(pickle.dumps(train))  # what a grain worker receives
    assert np.array_equal(again.labels, train.labels) and again.classes == full_train.classes


def test_repeats_make_an_epoch_of_the_subset_as_long_as_the_whole_split():
    full, _ = data.load_sources(data.DataConfig())
    train, _ = data.load_sources(data.DataConfig(label_fraction=0.1, subset_repeats=10))
    assert len(train) == 10 * len(train.picked) and abs(len(train) - len(full)) < 20
    assert set(train.indices) == set(train.picked)
    assert np.array_equal(np.bincount(train.labels), 10 * np.bincount(full.labels[train.picked]))
    # Each labelled image appears 10 times in an epoch's order, nothing else does.
    order = data.epoch_order(len(train), 0, seed=0, global_batch=len(train), repeats=1)
    assert np.array_equal(np.bincount(train.indices[order.ravel()])[train.picked], [10] * 142)
