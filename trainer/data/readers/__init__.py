"""Read CVAT exports (zips or folders; CVAT for images 1.1, CVAT for video 1.1 or COCO 1.0; task,
job or project) into one DetectionData.

Every consumer (train, evaluate, crop, inspect) goes through :func:`load_dataset`, so label
selection, skipped-shape counts, image identities and image checks are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from serverless.errors import UserError
from trainer.data.readers import coco
from trainer.data.readers.archive import default_cache_dir, open_export
from trainer.data.readers.cvat_xml import read_cvat_xml
from trainer.data.readers.detect import detect
from trainer.data.readers.identity import assign_sources
from trainer.data.readers.images import resolve_images
from trainer.data.readers.labels import label_classes, label_mapping, select
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
    export.tag = export.tag or path.stem
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
) -> DetectionData:
    """Read and merge ``sources`` into one dataset of images named by their identity.

    ``labels`` keeps only those labels, ``merge`` {"NEW": ["A", "B"]} renames; labels that hold
    no object (tag, skeleton, nothing drawn) are no classes (``not_classes`` says why). Images
    without objects are dropped unless ``keep_empty``; missing image files are an error unless
    ``skip_missing``. Zips are extracted once into ``cache_dir`` (default: see
    :func:`default_cache_dir`).
    """
    if not sources:
        raise UserError("no data given: name at least one CVAT export (zip or folder)")
    with gc_paused():
        exports = [read_export(s, cache_dir) for s in sources]
        classes, not_classes = label_classes(exports)
        order, mapping = label_mapping(classes, labels, merge, not_classes)
        data = DetectionData(labels=order, images=[], sources=[e.source for e in exports],
                             not_classes=not_classes)  # fmt: skip
        kept = []
        for export in exports:
            images = resolve_images(select(export, mapping, keep_empty), export, images_dir, skip_missing)
            kept.append((export, images))
            data.images += images
            data.skipped.update(export.skipped)
            data.notes.update(export.notes)
        assign_sources(kept)
    if not data.images:
        skipped = ", ".join(f"{k}: {v}" for k, v in data.skipped.items()) or "nothing"
        raise UserError(
            f"no images with objects left in {', '.join(data.sources)} "
            f"(labels {', '.join(order) or 'none with objects'}; skipped {skipped})"
        )
    return data
