"""The options that choose the data, shared by train, evaluate, crop and inspect.

:class:`DataOptions` is their one definition: each field's metadata gives its flag, help text and
parser, from which :mod:`trainer.commands` builds the command-line flags and reads ``--config``
YAML values through the same parsing. Kept free of heavy imports: parsers are built for ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from serverless.errors import UserError

if TYPE_CHECKING:
    from trainer.data.records import DetectionData, ImageRecord
    from trainer.data.splits import RecordedSplit, Split, SplitOptions

ROLES = ("train", "val", "test")
#: The label suffix ``predict --nv`` writes: such labels hold model output nobody validated yet.
UNVALIDATED_SUFFIX = "_NV"


def split_unvalidated(label: str) -> tuple[str, bool]:
    """("RBC", False) for "RBC_NV" (an unvalidated pre-annotation), ("RBC", True) for "RBC"."""
    if label.endswith(UNVALIDATED_SUFFIX) and len(label) > len(UNVALIDATED_SUFFIX):
        return label[: -len(UNVALIDATED_SUFFIX)], False
    return label, True


def with_unvalidated_labels(options: DataOptions) -> DataOptions:
    """The options of commands that report pre-annotations rather than learn from them (count,
    crop): unvalidated labels are read as labels of their own ("RBC_NV"), so they are counted and
    cut apart, unless --include-unvalidated reads them as their label."""
    from dataclasses import replace

    return options if options.include_unvalidated else replace(options, unvalidated_suffix="")


def parse_names(text: str) -> list[str]:
    """"RBC, WBC" -> ["RBC", "WBC"]."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"expected label names separated by commas, got {text!r}")
    return names


def parse_ids(text: str) -> list[int]:
    """"15,16" -> [15, 16]."""
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 1:
        raise ValueError(f"expected ids like 15,16, got {text!r}")
    return ids


def parse_pixels(text: str) -> int:
    """"300000000", "300e6" or "300M" -> 300000000 (a positive number of pixels)."""
    number, scale = text.strip().upper(), 1
    for suffix in ("MP", "M"):
        if number.endswith(suffix):
            number, scale = number[: -len(suffix)], 1_000_000
            break
    try:
        value = float(number) * scale
    except ValueError:
        value = 0.0
    if not 1 <= value < 2**63:
        raise ValueError(f"expected a number of pixels like 300000000 or 300M, got {text!r}")
    return int(value)


def parse_merge(text: str) -> tuple[str, list[str]]:
    """"NEW=A,B" -> ("NEW", ["A", "B"])."""
    new, sep, olds = text.partition("=")
    if not sep or not new.strip():
        raise ValueError(f"expected NEW=A,B, got {text!r}")
    return new.strip(), parse_names(olds)


def parse_subset_role(text: str) -> tuple[str, str]:
    """"batch 2=train" -> ("batch 2", "train")."""
    name, sep, role = text.rpartition("=")
    if not sep or not name or role not in ROLES:
        raise ValueError(f"expected NAME=train, NAME=val or NAME=test, got {text!r}")
    return name, role


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A dataclass field that is also a command-line flag and a ``--config`` key.

    ``meta`` keys read by :func:`trainer.commands.add_options`: ``parse`` (text -> value, raising
    ValueError that says what was expected), ``choices``, ``metavar``, ``flag`` (other spelling),
    ``positional``, ``append`` (repeatable; a list or a mapping in YAML), ``negate`` (a boolean
    that defaults to True and is switched off by this flag).
    """
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class DataOptions:
    """Which exports or server objects to read, which labels to keep, how to split."""

    data: list[str] = option(
        [], "CVAT exports: zip files or unpacked folders, 'CVAT for images 1.1' or 'COCO 1.0'",
        positional=True, metavar="DATA")
    images_dir: str | None = option(None, "folder holding the images (<subset>/<name>)", metavar="DIR")
    labels: list[str] | None = option(None, "keep only these labels", parse=parse_names, metavar="A,B")
    merge_label: list[tuple[str, list[str]]] = option(
        [], "train labels A and B as one label NEW (repeatable)", parse=parse_merge, append=True,
        metavar="NEW=A,B")
    keep_empty: bool = option(
        False, "keep images without objects as negatives (default: unannotated images are dropped)")
    skip_missing: bool = option(False, "leave out annotated images whose file is missing")
    subset_map: list[tuple[str, str]] = option(
        [], "role of a CVAT subset not named Train/Validation/Test (repeatable)",
        parse=parse_subset_role, append=True, metavar="NAME=train|val|test")
    val_fraction: float = option(
        0.2, "share of train images held out for validation when no subset says val, by a stable hash "
        "of each image (0.2; 0: no validation)", metavar="F")
    unvalidated_suffix: str = option(
        UNVALIDATED_SUFFIX, "labels ending in this hold unvalidated pre-annotations (predict --nv, "
        "--label-suffix): left out with the images holding them; '' reads every label", metavar="SUFFIX")
    include_unvalidated: bool = option(
        False, "use unvalidated pre-annotations anyway, as their label without the suffix")
    server: str | None = option(
        None, "CVAT server to download from (credentials: CVAT_ACCESS_TOKEN or CVAT_USER/CVAT_PASSWORD "
        "in the environment)", metavar="URL")
    project: int | None = option(None, "CVAT project to download", metavar="ID")
    tasks: list[int] | None = option(None, "CVAT tasks to download", parse=parse_ids, metavar="ID,ID")
    max_pixels: int | None = option(
        None, "largest image accepted, in pixels, e.g. 900M for whole slides (default: "
        "$CVAT_DETECTOR_MAX_PIXELS, else 268435456 = 16384x16384)", parse=parse_pixels, metavar="N")

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction: expected a fraction in [0, 1), got {self.val_fraction}")


def load_from_args(options: DataOptions, *, require_images: bool = True) -> DetectionData:
    """Download server sources (if any), then read every source with the chosen options.

    ``require_images`` refuses exports without image files (training needs pixels; ``inspect``
    does not).
    """
    from serverless.imageio import over_limit_message, pixel_limit
    from trainer.data.readers import default_cache_dir, load_dataset

    sources = list(options.data)
    downloaded, read_at = 0, ""
    if options.server:
        from trainer.cvat.server import connect, download_exports

        client = connect(options.server)
        cache = default_cache_dir() / "downloads"
        read_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        sources = download_exports(client, project=options.project, tasks=options.tasks, cache_dir=cache)
        downloaded = len(sources)
        sources += list(options.data)
    elif options.project is not None or options.tasks:
        raise UserError("--project and --tasks need --server URL")
    if not sources:
        raise UserError("no data given: name CVAT export zips/folders, or --server URL --project ID")
    data = load_dataset(
        sources,
        images_dir=options.images_dir,
        labels=options.labels,
        merge=merge_of(options) or None,
        keep_empty=options.keep_empty,
        skip_missing=options.skip_missing,
        unvalidated_suffix=options.unvalidated_suffix,
        include_unvalidated=options.include_unvalidated,
    )
    if options.server:
        data.server = server_provenance(options, read_at, [Path(s).name for s in sources[:downloaded]])
    if require_images and (without := [im for im in data.images if im.path is None]):
        raise UserError(
            f"{len(without)} images have no image file (the export holds annotations only, "
            f"e.g. {without[0].identity}); export with images, or pass --images-dir"
        )
    try:
        data.max_pixels = pixel_limit(options.max_pixels)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    huge = largest_image(data)
    if require_images and huge is not None and huge.width * huge.height > data.max_pixels:
        raise UserError(
            over_limit_message(f"image {huge.identity}", huge.width, huge.height, data.max_pixels)
        )
    return data


def merge_of(options: DataOptions) -> dict[str, list[str]]:
    merge: dict[str, list[str]] = {}
    for new, olds in options.merge_label:
        merge.setdefault(new, []).extend(olds)
    return merge


def server_provenance(options: DataOptions, read_at: str, exports: list[str]) -> dict[str, Any]:
    """What a run records of a server source: the URL without any user or password in it, the
    project/tasks, when the annotations were read, and the export files (named after CVAT's
    ``updated_date`` of each project/task, i.e. the annotations' version)."""
    parts = urlsplit(options.server or "")
    url = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return {"url": url, "project": options.project, "tasks": options.tasks, "read_at": read_at,
            "exports": exports}


def largest_image(data: DetectionData) -> ImageRecord | None:
    """The image with the most pixels (sizes come from the annotations, checked against the files'
    headers, so nothing is decoded)."""
    return max(data.images, key=lambda im: im.width * im.height, default=None)


def split_from_args(
    options: DataOptions, data: DetectionData, seed: int = 0, parent: RecordedSplit | None = None,
    parent_run: str | None = None, *, require_train: bool = True,
) -> Split:
    """Train/val/test lists following --subset-map, a parent run's recorded roles, the subsets
    and --val-fraction (:func:`trainer.data.splits.split_data`)."""
    from trainer.data.splits import split_data

    options_ = split_options(options, seed, parent_run if parent else None)
    return split_data(data, options_, parent, require_train=require_train)


def split_options(options: DataOptions, seed: int = 0, parent: str | None = None) -> SplitOptions:
    """Every data option that decides which images there are and which role each gets."""
    from trainer.data.splits import SplitOptions

    return SplitOptions(
        val_fraction=options.val_fraction, seed=seed, subset_map=dict(options.subset_map), parent=parent,
        labels=options.labels, merge_label=merge_of(options), keep_empty=options.keep_empty,
        include_unvalidated=options.include_unvalidated, unvalidated_suffix=options.unvalidated_suffix,
    )
