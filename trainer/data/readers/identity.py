"""Which records are one image, and which only share a name: ``ImageRecord.source``.

Microscopy tasks are often one folder per sample, each holding ``img_001.jpg``: two task exports
(or ``--tasks 15,16``) then list the same subset and name for different images. Such records get a
``source`` ("task 15", from the task id CVAT writes; "job 12"; else the export's file stem), so
their identities differ. The same image read twice (one task in two exports, one project in both
formats) must not be trained on twice, or be in training and validation at once: that is refused.
Records of different exports are the same image when their task ids agree, or, where an export
names no task (COCO, jobs), when they have the same size and the same objects (and the same file
bytes when they have no objects). ``source`` stays empty for every other image, so identities do not
change when a source is added that shares no name.
"""

from __future__ import annotations

import filecmp
from collections import defaultdict

from serverless.errors import UserError
from trainer.data.readers.parsed import ParsedExport
from trainer.data.records import ImageRecord, canonical_name


def assign_sources(exports: list[tuple[ParsedExport, list[ImageRecord]]]) -> None:
    """Set ``source`` where records of different tasks share subset and name; refuse duplicates."""
    by_name: dict[tuple[str, str], list[tuple[ParsedExport, ImageRecord]]] = defaultdict(list)
    for export, images in exports:
        for im in images:
            by_name[(im.subset, canonical_name(im.name))].append((export, im))
    for members in by_name.values():
        if len(members) > 1:
            _tell_apart(members)


def _tell_apart(members: list[tuple[ParsedExport, ImageRecord]]) -> None:
    for i, (export_a, a) in enumerate(members):
        for export_b, b in members[i + 1 :]:
            if export_a is export_b and (a.task_id is None or a.task_id == b.task_id):
                raise UserError(f"{export_a.source}: image {a.subset}/{a.name} is listed twice")
            if _same_image(a, b):
                raise UserError(
                    f"image {a.subset}/{a.name} appears in both {export_a.source} and {export_b.source} "
                    "(the same image twice: one task in two exports, or one project in both formats?); "
                    "give each image once"
                )
    labels = [_label(export, im) for export, im in members]
    if len(set(labels)) < len(labels):  # e.g. two COCO exports both called export.zip
        labels = [export.source for export, _ in members]
    for (_, im), label in zip(members, labels, strict=True):
        im.source = label


def _label(export: ParsedExport, im: ImageRecord) -> str:
    if im.task_id is not None:
        return f"task {im.task_id}"
    return export.tag


def _same_image(a: ImageRecord, b: ImageRecord) -> bool:
    """Whether two same-named records of different exports show one image."""
    if a.task_id is not None and b.task_id is not None:
        return a.task_id == b.task_id
    if (a.width, a.height) != (b.width, b.height) or _objects(a) != _objects(b):
        return False
    if a.shapes or a.path is None or b.path is None:
        return True
    return filecmp.cmp(a.path, b.path, shallow=False)


def _objects(im: ImageRecord) -> list[tuple[str, tuple[int, ...]]]:
    """The objects to the pixel, on which XML and COCO of one image agree (boxes, polygons and
    masks exactly; an ellipse's box differs between them by less than a pixel)."""
    return sorted((s.label, tuple(round(v) for v in s.box)) for s in im.shapes)
