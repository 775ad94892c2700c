"""Train/val/test split: CVAT subsets decide when they say so, otherwise a seeded split.

The split must not change between runs (evaluation would compare models on different images), so
the seeded split sorts images by (subset, name) before shuffling with its own generator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from serverless.errors import UserError
from trainer.data.options import ROLES
from trainer.data.records import DetectionData, ImageRecord

#: CVAT subset names (case-insensitive) that assign a role without --subset-map.
KNOWN_SUBSETS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class SplitOptions:
    """Everything that decides which role an image gets; saved in the run's provenance."""

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    subset_map: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SplitOptions:
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Split(Mapping):
    """The images of each role ("train", "val", "test") and the options that put them there."""

    def __init__(self, options: SplitOptions, roles: dict[str, list[ImageRecord]]) -> None:
        self.options = options
        self._roles = {role: list(roles.get(role, [])) for role in ROLES}

    def __getitem__(self, role: str) -> list[ImageRecord]:
        return self._roles[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def counts(self) -> dict[str, int]:
        return {role: len(images) for role, images in self._roles.items()}


def split_data(data: DetectionData, options: SplitOptions, *, require_train: bool = True) -> Split:
    """:func:`split_dataset` with its options kept beside the result."""
    roles = split_dataset(
        data, val_fraction=options.val_fraction, test_fraction=options.test_fraction,
        seed=options.seed, subset_map=options.subset_map, require_train=require_train,
    )
    return Split(options, roles)


def split_dataset(
    data: DetectionData,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    subset_map: dict[str, str] | None = None,
    require_train: bool = True,
) -> dict[str, list[ImageRecord]]:
    """{"train", "val", "test"} image lists.

    Subsets Train/Validation/Test (also val, valid; any case) and those named in ``subset_map``
    give their images a role; images of other subsets (e.g. "default") count as train. When no
    subset says val, ``val_fraction`` of the train images become val (seeded); when none says
    test, ``test_fraction`` of them become test. No training image is an error only with
    ``require_train`` (training needs them; a validation-only export is fine to inspect or evaluate).
    """
    _check_fractions(val_fraction, test_fraction)
    roles = _roles(subset_map)
    groups: dict[str | None, list[ImageRecord]] = {"train": [], "val": [], "test": [], None: []}
    for im in data.images:
        groups[roles.get(im.subset.casefold())].append(im)
    train, val, test = groups["train"], groups["val"], groups["test"]
    pool, share = train + groups[None], 1.0
    if test_fraction > 0 and not test:
        test, pool = _take(pool, test_fraction, seed)
        share -= test_fraction
    if val:
        train = pool
    else:
        val, train = _take(pool, val_fraction / share, seed)
    if not train and require_train:
        raise UserError(
            "no training images: every image is in a validation or test subset; "
            "map a subset to train with --subset-map NAME=train"
        )
    return {"train": train, "val": val, "test": test}


def _roles(subset_map: dict[str, str] | None) -> dict[str, str]:
    roles = dict(KNOWN_SUBSETS)
    for name, role in (subset_map or {}).items():
        if role not in ROLES:
            raise UserError(f"--subset-map {name}={role}: the role must be train, val or test")
        roles[name.casefold()] = role
    return roles


def _take(images: list[ImageRecord], fraction: float, seed: int):
    """(a seeded ``fraction`` of ``images``, the rest); at least one image each when possible."""
    if fraction <= 0 or len(images) < 2:
        return [], list(images)
    ordered = sorted(images, key=lambda im: im.key)
    random.Random(seed).shuffle(ordered)
    count = min(max(1, round(len(ordered) * fraction)), len(ordered) - 1)
    return ordered[:count], ordered[count:]


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"val fraction {val_fraction} and test fraction {test_fraction} must each be in "
            "[0, 1) and leave some images for training"
        )
