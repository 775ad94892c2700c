"""Subsets decide the split when they say train and val; otherwise a reproducible seeded split."""

from __future__ import annotations

import pytest

from serverless.errors import UserError
from trainer.data.records import DetectionData, ImageRecord, Shape
from trainer.data.splits import (
    RecordedSplit,
    SplitOptions,
    read_split,
    split_data,
    split_dataset,
    write_split,
)


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


def ids(images) -> set[str]:
    return {im.identity for im in images}


def test_without_a_val_subset_the_split_is_seeded_and_reproducible():
    data = dataset(default=50)
    first = split_dataset(data, val_fraction=0.2, seed=3)
    again = split_dataset(dataset(default=50), val_fraction=0.2, seed=3)
    assert [im.key for im in first["val"]] == [im.key for im in again["val"]]
    other = split_dataset(data, val_fraction=0.2, seed=4)
    assert [im.key for im in first["val"]] != [im.key for im in other["val"]]
    reversed_data = DetectionData(labels=["a"], images=data.images[::-1])
    assert {im.key for im in split_dataset(reversed_data, seed=3)["val"]} == {
        im.key for im in first["val"]}  # order of the sources does not matter  # fmt: skip


def test_hashed_fractions_are_about_right():
    # 2000 images at 0.2: the val count is Binomial(2000, 0.2): mean 400, sd 17.9; +-5 sd.
    split = split_dataset(dataset(default=2000), val_fraction=0.2, test_fraction=0.1, seed=0)
    assert 400 - 90 <= len(split["val"]) <= 400 + 90
    assert 200 - 70 <= len(split["test"]) <= 200 + 70  # sd 13.4


def test_growing_or_shrinking_the_export_moves_no_image():
    """The loop: an export that gains images (or loses some) keeps every other image's role."""
    small = dataset(default=40)
    grown = DetectionData(labels=["a"], images=dataset(default=60).images[5:])  # 5 gone, 20 new
    before = split_dataset(small, val_fraction=0.25, test_fraction=0.1, seed=7)
    after = split_dataset(grown, val_fraction=0.25, test_fraction=0.1, seed=7)
    kept = ids(small.images) & ids(grown.images)
    assert len(kept) == 35
    for role in ("train", "val", "test"):
        assert ids(before[role]) & kept == ids(after[role]) & kept, role
    assert before["val"] and after["val"] and after["test"]


def test_a_parent_runs_roles_win_over_subsets_and_hash_but_not_over_subset_map():
    data = dataset(default=30, Validation=4)
    plain = split_data(data, SplitOptions(seed=1))
    parent_train = sorted(ids(plain["train"]))
    parent = RecordedSplit({"train": set(parent_train[:3]), "val": {"Validation/Validation_0.jpg"}
                            | set(parent_train[3:6]), "test": set()}, SplitOptions(seed=1))
    child = split_data(data, SplitOptions(seed=1), parent)
    assert set(parent_train[3:6]) <= ids(child["val"])  # the parent validated on them
    assert "Validation/Validation_0.jpg" in ids(child["val"])
    assert set(parent_train[:3]) <= ids(child["train"])
    # a new Validation image the parent trained on stays in training, and the user is told
    parent.roles["train"].add("Validation/Validation_1.jpg")
    child = split_data(data, SplitOptions(seed=1), parent)
    assert "Validation/Validation_1.jpg" in ids(child["train"])
    assert any("although their subset says val" in note for note in child.notes)
    mapped = split_data(data, SplitOptions(seed=1, subset_map={"default": "train"}), parent)
    assert set(parent_train[3:6]) <= ids(mapped["train"])
    assert any("moved to train by --subset-map" in note for note in mapped.notes)


def test_test_fraction_is_taken_when_no_subset_says_test():
    split = split_dataset(dataset(Train=40), val_fraction=0.2, test_fraction=0.1)
    assert split["val"] and split["test"] and len(split["train"]) > 20
    assert sum(map(len, split.values())) == 40
    assert not ids(split["val"]) & ids(split["test"])
    with_subset = split_dataset(dataset(Train=40, Testing=2), test_fraction=0.5)
    assert {im.subset for im in with_subset["test"]} == {"Testing"}  # the subset decides, no hash


def test_the_recorded_split_reads_back(tmp_path):
    split = split_data(dataset(default=20, Test=2), SplitOptions(seed=5, keep_empty=True))
    write_split(tmp_path, split)
    recorded = read_split(tmp_path)
    assert recorded.roles == {role: ids(images) for role, images in split.items()}
    assert recorded.options == split.options
    assert read_split(tmp_path / "elsewhere") is None


def test_nothing_to_train_on_is_an_error():
    with pytest.raises(UserError, match="no training images"):
        split_dataset(dataset(Validation=3))
    with pytest.raises(UserError, match="must each be in"):
        split_dataset(dataset(Train=3), val_fraction=1.0)
