"""Read CVAT exports (zips or folders, CVAT for images 1.1 or COCO 1.0) into one DetectionData.

Every consumer (train, evaluate, crop, inspect) goes through :func:`load_dataset`, so label
selection, skipped-shape counts and image checks are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from serverless.errors import UserError
from trainer.data.readers import coco
from trainer.data.readers.archive import default_cache_dir, open_export
from trainer.data.readers.cvat_xml import read_cvat_xml
from trainer.data.readers.detect import detect
from trainer.data.readers.images import resolve_images
from trainer.data.readers.labels import drop_unvalidated, label_mapping, merge_unvalidated, select
from trainer.data.readers.parsed import ParsedExport, gc_paused
from trainer.data.readers.summary import format_summary
from trainer.data.records import DetectionData

__all__ = ["default_cache_dir", "format_summary", "load_dataset", "read_export"]


def read_export(source: str | Path, cache_dir: str | Path | None = None) -> ParsedExport:
    """Parse one export (zip, folder or annotation file) without touching its images."""
    path = Path(source).expanduser()
    fmt, files, root = detect(open_export(path, cache_dir), str(source))
    export = ParsedExport(source=str(source), root=root, format=fmt)
    if fmt == coco.FORMAT:
        coco.read_coco(files, export)
    else:
        read_cvat_xml(files[0], export)
    return export


def load_dataset(
    sources: Sequence[str | Path],
    *,
    images_dir: str | Path | None = None,
    labels: list[str] | None = None,
    merge: dict[str, list[str]] | None = None,
    keep_empty: bool = False,
    skip_missing: bool = False,
    cache_dir: str | Path | None = None,
    unvalidated_suffix: str = "",
    include_unvalidated: bool = False,
) -> DetectionData:
    """Read and merge ``sources`` into one dataset (images keyed by (subset, name)).

    ``labels`` keeps only those labels, ``merge`` {"NEW": ["A", "B"]} renames; images without
    objects are dropped unless ``keep_empty``; missing image files are an error unless
    ``skip_missing``. Zips are extracted once into ``cache_dir`` (default: see
    :func:`default_cache_dir`). Labels ending in ``unvalidated_suffix`` hold unvalidated
    pre-annotations: left out with the images holding them, or with ``include_unvalidated`` read as
    their label without the suffix (:mod:`trainer.data.readers.labels`).
    """
    if not sources:
        raise UserError("no data given: name at least one CVAT export (zip or folder)")
    with gc_paused():
        exports = [read_export(s, cache_dir) for s in sources]
        _check_unique(exports)
        if unvalidated_suffix and not include_unvalidated:
            for export in exports:
                drop_unvalidated(export, unvalidated_suffix)
        known: list[str] = []
        for export in exports:
            shape_labels = (s.label for im in export.images for s in im.shapes)
            known += [n for n in dict.fromkeys([*export.labels, *shape_labels]) if n not in known]
        if unvalidated_suffix and include_unvalidated:
            merge = merge_unvalidated(known, merge, unvalidated_suffix)
        order, mapping = label_mapping(known, labels, merge)
        data = DetectionData(labels=order, images=[], sources=[e.source for e in exports])
        for export in exports:
            images = select(export, mapping, keep_empty)
            data.images += resolve_images(images, export, images_dir, skip_missing)
            data.skipped.update(export.skipped)
            data.notes.update(export.notes)
    if not data.images:
        skipped = ", ".join(f"{k}: {v}" for k, v in data.skipped.items()) or "nothing"
        raise UserError(
            f"no images with objects left in {', '.join(data.sources)} "
            f"(labels {', '.join(order)}; skipped {skipped})"
        )
    return data


def _check_unique(exports: list[ParsedExport]) -> None:
    """Images are keyed by (subset, name); the same key twice would train on one image twice."""
    owner: dict[tuple[str, str], str] = {}
    for export in exports:
        seen: set[tuple[str, str]] = set()
        for im in export.images:
            if im.key in seen:
                raise UserError(f"{export.source}: image {im.subset}/{im.name} is listed twice")
            if im.key in owner:
                raise UserError(
                    f"image {im.subset}/{im.name} appears in both {owner[im.key]} and "
                    f"{export.source}; each (subset, image name) may appear once across sources"
                )
            seen.add(im.key)
        owner.update(dict.fromkeys(seen, export.source))
