"""Grouped CVAT shapes become one object, exactly as CVAT's own COCO export merges them.

In "CVAT for images/video 1.1" the parts of a group are separate shapes sharing a ``group_id``; in
"COCO 1.0" CVAT has already merged them into one annotation. Reading a group from XML must give
the object CVAT's COCO export writes for it, so both formats train on the same thing. CVAT hands
the parts to datumaro's COCO exporter (``CocoExporter`` in ``coco/exporter.py``, called from
``cvat/apps/dataset_manager/formats/coco.py``) after turning boxes into unrotated ``Bbox`` (rotation
kept as an attribute), masks into ``RleMask`` and ellipses into masks (``EllipsesToMasks``).
``find_instance_parts`` then decides:

- leader: ``find_group_leader`` = ``max(boxes + polygons + masks, key=get_area)`` (first one wins a
  tie; areas: box w*h, polygon shoelace, mask pixel count); the object takes its label, occlusion
  and attributes (``is_crowd`` included), whatever labels the other parts carry;
- box: ``max_bbox`` of the boxes when the group has any (CVAT >= 2.25), else of all parts;
- outline: ``use_masks = is_crowd, else whether a mask of the leader's label is in the group``;
  then the polygons are rasterised and OR-ed with the masks into one mask, otherwise the polygons
  are kept side by side (masks of other labels are traced into polygons there; here they stay one
  mask of the same pixels, as polygons cannot hold them exactly).
"""

from __future__ import annotations

import math

import numpy as np
from faster_coco_eval.core import mask as mask_utils

from trainer.data.readers.geometry import bitmap_shape, finish, rotated_box
from trainer.data.readers.parsed import GROUPED, ROTATED, ParsedExport
from trainer.data.records import Shape

Box = tuple[float, float, float, float]


def merge_groups(shapes: list[Shape], width: int, height: int, out: ParsedExport) -> list[Shape]:
    """Each group of ``shapes`` (group != 0) merged into one object at its first part's place.

    Parts arrive as CVAT's exporter sees them: boxes upright with their ``rotation``, ellipses as
    masks, nothing clipped; the merged object is clipped to the image (or dropped and counted).
    """
    groups: dict[int, list[Shape]] = {}
    for shape in shapes:
        if shape.group:
            groups.setdefault(shape.group, []).append(shape)
    merged: list[Shape] = []
    for shape in shapes:
        if not shape.group:
            merged.append(shape)
            continue
        parts = groups.pop(shape.group, None)
        if parts is None:  # the group was placed at its first part
            continue
        if len(parts) > 1:
            out.notes[GROUPED] += 1
        whole = merge_parts(parts, width, height) if len(parts) > 1 else _alone(parts[0], out)
        whole = finish(whole, width, height, out)
        if whole is not None:
            merged.append(whole)
    return merged


def merge_parts(parts: list[Shape], width: int, height: int) -> Shape:
    """The one object CVAT's COCO export writes for a group of two or more parts."""
    boxes = [p for p in parts if p.kind == "rectangle"]
    polygons = [p for p in parts if p.kind == "polygon"]
    masks = [p for p in parts if p.mask is not None]
    leader = max(boxes + polygons + masks, key=_area)
    box = _union([p.box for p in boxes] or [p.box for p in parts])
    common = {"label": leader.label, "occluded": leader.occluded, "group": leader.group,
              "attributes": dict(leader.attributes)}  # fmt: skip
    crowd = leader.attributes.get("is_crowd")
    use_masks = crowd.lower() == "true" if crowd is not None else any(
        m.label == leader.label for m in masks)  # fmt: skip
    if use_masks or masks:
        shape = _union_mask(polygons + masks, box, width, height, common)
        if shape is not None:
            return shape
    if polygons:
        return Shape(kind="polygon", box=box, polygons=[r for p in polygons for r in p.polygons], **common)
    if leader.rotation % 360:  # boxes only: COCO keeps the union and the leader's rotation
        return rotated_box(*box, leader.rotation, **common)
    return Shape(kind="rectangle", box=box, **common)


def _alone(shape: Shape, out: ParsedExport) -> Shape:
    """A group of one part is that part, as ungrouped shapes are read."""
    if shape.kind == "rectangle" and shape.rotation % 360:
        out.notes[ROTATED] += 1
        fields = {"label": shape.label, "occluded": shape.occluded, "attributes": shape.attributes,
                  "group": shape.group, "object_id": shape.object_id}  # fmt: skip
        return rotated_box(*shape.box, shape.rotation, **fields)
    return shape


def _area(shape: Shape) -> float:
    """datumaro's ``get_area``: Bbox w*h (upright), Polygon shoelace, Mask pixel count."""
    if shape.mask is not None:
        return float(np.count_nonzero(shape.mask))
    if shape.kind == "polygon":
        ring = np.asarray(shape.polygons[0], dtype=np.float64)
        x, y = ring[0::2], ring[1::2]
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2
    x0, y0, x1, y1 = shape.box
    return (x1 - x0) * (y1 - y0)


def _union(boxes: list[Box]) -> Box:
    """datumaro's ``max_bbox``: the smallest box holding every box."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))  # fmt: skip


def _union_mask(parts: list[Shape], box: Box, width: int, height: int, common: dict) -> Shape | None:
    """One mask of every polygon (rasterised as COCO does) and mask, with the group's box.

    Only the window the parts cover is rasterised, so a group on a whole-slide image costs what
    the group covers, not the slide.
    """
    extent = _union([p.box for p in parts])
    left, top = max(math.floor(extent[0]), 0), max(math.floor(extent[1]), 0)
    right, bottom = min(math.ceil(extent[2]), width), min(math.ceil(extent[3]), height)
    if right <= left or bottom <= top:
        return None
    window = np.zeros((bottom - top, right - left), dtype=bool)
    for part in parts:
        if part.mask is not None:
            _paste(window, part.mask, part.mask_origin[0] - left, part.mask_origin[1] - top)
        else:
            window |= _rasterise(part.polygons, left, top, window.shape)
    shape = bitmap_shape(window, left, top, **common)
    if shape is not None:
        shape.box = box
    return shape


def _rasterise(rings: list[list[float]], left: int, top: int, hw: tuple[int, int]) -> np.ndarray:
    """Polygons as pycocotools rasterises them (``frPyObjects``), in a window at (left, top)."""
    shifted = [[v - (left if i % 2 == 0 else top) for i, v in enumerate(r)] for r in rings]
    rles = mask_utils.frPyObjects(shifted, hw[0], hw[1])
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _paste(window: np.ndarray, bitmap: np.ndarray, x: int, y: int) -> None:
    h, w = bitmap.shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, window.shape[1]), min(y + h, window.shape[0])
    if x1 > x0 and y1 > y0:
        window[y0:y1, x0:x1] |= bitmap[y0 - y : y1 - y, x0 - x : x1 - x]
