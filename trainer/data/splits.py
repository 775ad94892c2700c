"""Train/val/test split: CVAT subsets decide when they say so, otherwise a stable hash of each image.

The annotate → train → pre-annotate → correct → retrain loop needs roles that never move: an image
whose role no subset decides gets it from a hash of its identity (:attr:`ImageRecord.identity`) and
the seed alone, mapped to [0, 1) and compared with the fractions (test below ``test_fraction``, val
in the next ``val_fraction``). So an export that grows keeps every earlier image in its role and
removing images moves none of the others. The price: counts are about the fractions, not exactly
them, and a very small export can end without a validation image (training then runs without
validation and says so; when the hash would hold out every image, those it held out train) — a
rule that forced one would have to move images when the data changes.

Every run records its roles (``split.json``, :func:`write_split`): ``evaluate`` reads them back, and
a retraining keeps its parent's roles for every image the parent had, so an image the parent
validated on is never trained on, and one it trained on is never used to validate.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serverless.bundle import SPLIT_JSON, atomic_write
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
#: How images no subset decides get their role; recorded so that a later change is recognised.
METHOD = "hash-sha256"


@dataclass(frozen=True)
class SplitOptions:
    """Everything that decides which images there are and which role each gets; saved in the
    run's provenance and split.json. The last group only chooses the images (with a hash split,
    one image's role never depends on the others) but is recorded all the same."""

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    subset_map: dict[str, str] = field(default_factory=dict)
    parent: str | None = None  # the run whose recorded roles were kept (a retraining)
    method: str = METHOD
    labels: list[str] | None = None
    merge_label: dict[str, list[str]] = field(default_factory=dict)
    keep_empty: bool = False
    include_unvalidated: bool = False
    unvalidated_suffix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SplitOptions:
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**{"method": "", **known})  # runs older than the field used a seeded shuffle


@dataclass
class RecordedSplit:
    """A run's split.json: the identities of its images per role, and the options."""

    roles: dict[str, set[str]]
    options: SplitOptions

    def role_of(self, identity: str) -> str | None:
        return next((role for role, ids in self.roles.items() if identity in ids), None)


class Split(Mapping):
    """The images of each role ("train", "val", "test") and the options that put them there."""

    def __init__(self, options: SplitOptions, roles: dict[str, list[ImageRecord]],
                 notes: Counter | None = None) -> None:
        self.options = options
        self._roles = {role: list(roles.get(role, [])) for role in ROLES}
        #: What the user should know about how roles were given (printed by train).
        self.notes = notes or Counter()

    def __getitem__(self, role: str) -> list[ImageRecord]:
        return self._roles[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def counts(self) -> dict[str, int]:
        return {role: len(images) for role, images in self._roles.items()}


def split_data(
    data: DetectionData, options: SplitOptions, parent: RecordedSplit | None = None, *,
    require_train: bool = True,
) -> Split:
    """Each image's role, first rule that applies: --subset-map, the ``parent`` run's recorded
    role, the CVAT subset's name (Train/Validation/Test), the hash (:func:`hash_role`; also for
    train subsets when no subset says val or test). No training image is an error only with
    ``require_train`` (training needs them; a validation-only export is fine to inspect or evaluate)."""
    _check_fractions(options.val_fraction, options.test_fraction)
    mapped = _roles(options.subset_map)
    subsets = {im.subset.casefold() for im in data.images}
    subset_roles = {s: mapped.get(s) or KNOWN_SUBSETS.get(s) for s in subsets}
    said = set(subset_roles.values())
    roles: dict[str, list[ImageRecord]] = {role: [] for role in ROLES}
    hashed: list[ImageRecord] = []  # images the hash held out
    notes: Counter = Counter()
    for im in data.images:
        subset = im.subset.casefold()
        inherited = parent.role_of(im.identity) if parent else None
        if inherited:
            role = mapped.get(subset, inherited)
            notes.update(_inheritance_notes(inherited, role, subset_roles[subset], subset in mapped))
        else:
            role = subset_roles[subset] or "train"
            if role == "train":
                role = hash_role(im.identity, options, test="test" not in said, val="val" not in said)
                hashed += [im] if role != "train" else []
        roles[role].append(im)
    if not roles["train"] and hashed:
        _train_on_all(roles, hashed, notes)
    if not roles["train"] and require_train:
        raise UserError(
            f"no training images: all {len(data.images)} images are in validation or test "
            "(subsets, --val-fraction or the parent run's roles); map a subset to train with "
            "--subset-map NAME=train or lower --val-fraction"
        )
    return Split(options, roles, notes)


def _train_on_all(roles: dict[str, list[ImageRecord]], hashed: list[ImageRecord], notes: Counter) -> None:
    """Too few images for the hash to leave one in training: those it held out train instead (and
    the run has no hashed validation). Holding one out by another rule would move it as data grows;
    a run records its roles, so a retrain or an evaluation of it never sees them move."""
    moved = {id(im) for im in hashed}
    for role in ("val", "test"):
        roles[role] = [im for im in roles[role] if id(im) not in moved]
    roles["train"] = list(hashed)
    notes["images the hash held out train instead: too few images to hold any out"] += len(hashed)


def _inheritance_notes(inherited: str, role: str, subset_role: str | None, mapped: bool) -> list[str]:
    notes = [f"images keep the role the parent run gave them ({inherited})"] if role == inherited else []
    if role != inherited:
        notes.append(f"images the parent run had in {inherited} moved to {role} by --subset-map")
    elif subset_role and subset_role != inherited and not mapped:
        notes.append(f"images stay in {inherited} as in the parent run although their subset says "
                     f"{subset_role} (--subset-map decides otherwise)")
    return notes


def split_dataset(
    data: DetectionData,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    subset_map: dict[str, str] | None = None,
    require_train: bool = True,
) -> dict[str, list[ImageRecord]]:
    """{"train", "val", "test"} image lists (:func:`split_data` without a parent).

    Subsets Train/Validation/Test (also val, valid; any case) and those named in ``subset_map``
    give their images a role; images of other subsets (e.g. "default") count as train. When no
    subset says val, about ``val_fraction`` of the train images become val (by hash); when none
    says test, about ``test_fraction`` of them become test. No training image is an error only
    with ``require_train``.
    """
    options = SplitOptions(val_fraction, test_fraction, seed, dict(subset_map or {}))
    return dict(split_data(data, options, require_train=require_train))


def hash_role(identity: str, options: SplitOptions, *, test: bool = True, val: bool = True) -> str:
    """The role the hash gives an image: test in [0, test_fraction), val in the next
    ``val_fraction``, train above (bands whose role a subset already fills count as train)."""
    digest = hashlib.sha256(f"{options.seed}\0{identity}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2.0**64
    if point < options.test_fraction:
        return "test" if test else "train"
    if point < options.test_fraction + options.val_fraction:
        return "val" if val else "train"
    return "train"


def write_split(run_dir: str | Path, split: Split) -> None:
    """split.json: the identities of every role's images, sorted, with the options."""
    content = {
        "options": split.options.to_dict(),
        "roles": {role: sorted(im.identity for im in images) for role, images in split.items()},
    }
    text = json.dumps(content, indent=1) + "\n"
    atomic_write(Path(run_dir) / SPLIT_JSON, lambda f: f.write(text.encode()))


def read_split(run_dir: str | Path) -> RecordedSplit | None:
    """A run's recorded split; None for runs written before runs recorded one."""
    path = Path(run_dir) / SPLIT_JSON
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        roles = {role: set(content["roles"].get(role, [])) for role in ROLES}
        return RecordedSplit(roles, SplitOptions.from_dict(content.get("options", {})))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a split file this version can read ({exc})") from exc


def _roles(subset_map: dict[str, str] | None) -> dict[str, str]:
    roles = {}
    for name, role in (subset_map or {}).items():
        if role not in ROLES:
            raise UserError(f"--subset-map {name}={role}: the role must be train, val or test")
        roles[name.casefold()] = role
    return roles


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"val fraction {val_fraction} and test fraction {test_fraction} must each be in "
            "[0, 1) and leave some images for training"
        )
