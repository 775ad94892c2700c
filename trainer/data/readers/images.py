"""Image files of an export: where they are, whether they exist, whether their size is right.

A mismatch between an annotation's image size and the real file (a re-encoded or EXIF-rotated
frame, the wrong images folder) silently ruins training, so it stops loading with a clear list.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import UnidentifiedImageError

from serverless.errors import UserError
from serverless.imageio import image_size
from trainer.data.readers.parsed import MISSING, NO_IMAGES, ParsedExport, name_problem
from trainer.data.records import ImageRecord

SHOWN = 5  # how many offending files an error lists


def resolve_images(
    images: list[ImageRecord],
    export: ParsedExport,
    images_dir: str | Path | None,
    skip_missing: bool,
) -> list[ImageRecord]:
    """Set ``path`` of each image; drop (count) or refuse missing files; check sizes."""
    base = Path(images_dir) if images_dir is not None else export.root / "images"
    if images_dir is None and not base.is_dir():
        export.notes[NO_IMAGES] += len(images)  # an annotations-only export: paths stay None
        return images
    found, missing = [], []
    for im in images:
        im.path = _locate(base, im, export.source)
        (found if im.path is not None else missing).append(im)
    if missing:  # CVAT's COCO export lower-cases extensions (2.32+), its XML keeps them
        index = _case_index(base)
        for im in missing:
            name = im.name.replace("\\", "/").lower()
            im.path = index.get(f"{im.subset.lower()}/{name}") or index.get(name)
        found += [im for im in missing if im.path is not None]
        missing = [im for im in missing if im.path is None]
    if missing and not skip_missing:
        names = ", ".join(m.identity for m in missing[:SHOWN])
        raise UserError(
            f"{export.source}: {len(missing)} of {len(images)} image files are missing from "
            f"{base} (looked for <subset>/<name> and <name>), e.g. {names}; "
            "pass --images-dir if they are elsewhere, or --skip-missing to leave them out"
        )
    if missing:
        export.skipped[MISSING] += len(missing)
    _check_sizes(found, export.source)
    return [im for im in images if im.path is not None]


def _case_index(base: Path) -> dict[str, Path]:
    """Every file under ``base`` by its lower-cased relative path."""
    return {
        os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/").lower(): Path(root, f)
        for root, _, files in os.walk(base)
        for f in files
    }


def _locate(base: Path, im: ImageRecord, source: str) -> Path | None:
    """images/<subset>/<name> (CVAT 2.x project exports), else images/<name> (older, tasks).

    os.path on strings: this runs once per image, and pathlib costs twice as much.
    """
    name = im.name.replace("\\", "/")
    if problem := name_problem(im.name):
        raise UserError(f"{source}: image name {im.name!r} {problem}; refusing it")
    for candidate in (os.path.join(base, im.subset, name), os.path.join(base, name)):
        if os.path.isfile(candidate):
            return Path(candidate)
    return None


def _check_sizes(images: list[ImageRecord], source: str) -> None:
    wrong = []
    for im in images:
        try:
            size = image_size(im.path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:  # PIL's header errors
            raise UserError(f"{im.path}: not a readable image ({exc})") from exc
        if size != (im.width, im.height):
            wrong.append(f"{im.path} is {size[0]}x{size[1]}, annotated as {im.width}x{im.height}")
    if wrong:
        raise UserError(
            f"{source}: {len(wrong)} image files differ in size from their annotations "
            f"(wrong images folder, or frames re-encoded after annotation?): "
            + "; ".join(wrong[:SHOWN])
        )
