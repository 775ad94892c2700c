"""Subsets decide the split when they say train and val; otherwise a reproducible seeded split."""

from __future__ import annotations

import pytest

from serverless.errors import UserError
from trainer.data.records import DetectionData, ImageRecord, Shape
from trainer.data.splits import split_dataset


def dataset(**subsets: int) -> DetectionData:
    images = [
        ImageRecord(
            subset, f"{subset}_{i}.jpg", 10, 10, None, [Shape("a", "rectangle", (1, 1, 5, 5))]
        )
        for subset, count in subsets.items()
        for i in range(count)
    ]
    return DetectionData(labels=["a"], images=images)


def counts(split) -> dict[str, int]:
    return {role: len(images) for role, images in split.items()}


def test_cvat_subsets_decide_case_insensitively():
    assert counts(split_dataset(dataset(Train=5, Validation=2, Test=1))) == {
        "train": 5, "val": 2, "test": 1}  # fmt: skip
    assert counts(split_dataset(dataset(train=5, VAL=2))) == {"train": 5, "val": 2, "test": 0}
    assert counts(split_dataset(dataset(TRAIN=5, valid=3))) == {"train": 5, "val": 3, "test": 0}


def test_other_subsets_join_train_or_follow_subset_map():
    data = dataset(Train=4, Validation=2, batch2=3)
    assert counts(split_dataset(data)) == {"train": 7, "val": 2, "test": 0}
    assert counts(split_dataset(data, subset_map={"batch2": "test"})) == {
        "train": 4, "val": 2, "test": 3}  # fmt: skip
    with pytest.raises(UserError, match="batch2=holdout: the role must be train, val or test"):
        split_dataset(data, subset_map={"batch2": "holdout"})


def test_without_a_val_subset_the_split_is_seeded_and_reproducible():
    data = dataset(default=50)
    first = split_dataset(data, val_fraction=0.2, seed=3)
    assert counts(first) == {"train": 40, "val": 10, "test": 0}
    again = split_dataset(dataset(default=50), val_fraction=0.2, seed=3)
    assert [im.key for im in first["val"]] == [im.key for im in again["val"]]
    other = split_dataset(data, val_fraction=0.2, seed=4)
    assert [im.key for im in first["val"]] != [im.key for im in other["val"]]
    reversed_data = DetectionData(labels=["a"], images=data.images[::-1])
    assert {im.key for im in split_dataset(reversed_data, seed=3)["val"]} == {
        im.key for im in first["val"]}  # order of the sources does not matter  # fmt: skip


def test_test_fraction_is_taken_when_no_subset_says_test():
    split = split_dataset(dataset(Train=40), val_fraction=0.2, test_fraction=0.1)
    assert counts(split) == {"train": 28, "val": 8, "test": 4}
    assert not {im.key for im in split["val"]} & {im.key for im in split["test"]}


def test_nothing_to_train_on_is_an_error():
    with pytest.raises(UserError, match="no training images"):
        split_dataset(dataset(Validation=3))
    with pytest.raises(UserError, match="must each be in"):
        split_dataset(dataset(Train=3), val_fraction=1.0)
