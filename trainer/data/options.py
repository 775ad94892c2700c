"""Command-line options that choose the training data, shared by train, evaluate, crop, inspect.

One definition keeps the options, their spelling and their meaning identical in every command.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # parsers are built for --help: keep this module free of heavy imports
    from trainer.data.records import DetectionData, ImageRecord


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA... exports plus the options selecting labels, images, subsets and server sources."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "data",
        nargs="*",
        metavar="DATA",
        help="CVAT exports: zip files or unpacked folders, 'CVAT for images 1.1' or 'COCO 1.0'",
    )
    g.add_argument(
        "--images-dir", metavar="DIR", help="folder holding the images (<subset>/<name>)"
    )
    g.add_argument("--labels", type=_names, metavar="A,B", help="keep only these labels")
    g.add_argument(
        "--merge-label",
        action="append",
        type=_merge_spec,
        default=[],
        metavar="NEW=A,B",
        help="train labels A and B as one label NEW (repeatable)",
    )
    g.add_argument(
        "--keep-empty",
        action="store_true",
        help="keep images without objects as negatives (default: unannotated images are dropped)",
    )
    g.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out annotated images whose file is missing",
    )
    g.add_argument(
        "--subset-map",
        action="append",
        type=_subset_spec,
        default=[],
        metavar="NAME=train|val|test",
        help="role of a CVAT subset not named Train/Validation/Test (repeatable)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of train images held out for validation when no subset says val (0.2)",
    )
    g.add_argument("--server", metavar="URL", help="CVAT server to download from (credentials: "
                   "CVAT_ACCESS_TOKEN or CVAT_USER/CVAT_PASSWORD in the environment)")  # fmt: skip
    g.add_argument("--project", type=int, metavar="ID", help="CVAT project to download")
    g.add_argument("--tasks", type=_ids, metavar="ID,ID", help="CVAT tasks to download")


def load_from_args(args: argparse.Namespace, *, require_images: bool = True) -> DetectionData:
    """Download server sources (if any), then read every source with the chosen options.

    ``require_images`` refuses exports without image files (training needs pixels; ``inspect``
    does not).
    """
    from serverless.errors import UserError
    from trainer.data.readers import default_cache_dir, load_dataset

    sources = list(args.data)
    if args.server:
        from trainer.cvat.download import connect, download_exports

        client = connect(args.server)
        cache = default_cache_dir() / "downloads"
        sources = download_exports(client, project=args.project, tasks=args.tasks, cache_dir=cache)
        sources += list(args.data)
    elif args.project is not None or args.tasks:
        raise UserError("--project and --tasks need --server URL")
    if not sources:
        raise UserError(
            "no data given: name CVAT export zips/folders, or --server URL --project ID"
        )
    merge: dict[str, list[str]] = {}
    for new, olds in args.merge_label:
        merge.setdefault(new, []).extend(olds)
    data = load_dataset(
        sources,
        images_dir=args.images_dir,
        labels=args.labels,
        merge=merge or None,
        keep_empty=args.keep_empty,
        skip_missing=args.skip_missing,
    )
    if require_images and (without := [im for im in data.images if im.path is None]):
        raise UserError(
            f"{len(without)} images have no image file (the export holds annotations only, "
            f"e.g. {without[0].subset}/{without[0].name}); export with images, or pass --images-dir"
        )
    return data


def split_from_args(args: argparse.Namespace, data: DetectionData) -> dict[str, list[ImageRecord]]:
    """Train/val/test lists following the subsets, --subset-map and --val-fraction."""
    from trainer.data.splits import split_dataset

    return split_dataset(
        data,
        val_fraction=args.val_fraction,
        seed=getattr(args, "seed", 0) or 0,
        subset_map=dict(args.subset_map),
    )


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected label names separated by commas, got {text!r}")
    return names


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ids like 15,16, got {text!r}") from None


def _merge_spec(text: str) -> tuple[str, list[str]]:
    new, sep, olds = text.partition("=")
    if not sep or not new.strip():
        raise argparse.ArgumentTypeError(f"expected NEW=A,B, got {text!r}")
    return new.strip(), _names(olds)


def _subset_spec(text: str) -> tuple[str, str]:
    name, sep, role = text.rpartition("=")
    if not sep or not name or role not in ("train", "val", "test"):
        raise argparse.ArgumentTypeError(
            f"expected NAME=train, NAME=val or NAME=test, got {text!r}"
        )
    return name, role
