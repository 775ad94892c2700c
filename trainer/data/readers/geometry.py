"""Geometry shared by the readers: every CVAT shape becomes an axis-aligned box inside the image.

Detectors train on axis-aligned boxes: rotated boxes and ellipses are replaced by their envelope,
shapes partly outside the image are clipped, and shapes with less than a pixel inside are dropped.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.data.readers.parsed import CLIPPED, DEGENERATE, GROUPED, ParsedExport
from trainer.data.records import Shape

Box = tuple[float, float, float, float]


def rotated_envelope(x0: float, y0: float, x1: float, y1: float, degrees: float) -> Box:
    """Axis-aligned envelope of the box rotated by ``degrees`` about its centre."""
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    ex, ey = hw * c + hh * s, hw * s + hh * c
    return (cx - ex, cy - ey, cx + ex, cy + ey)


def rotated_corners(x0: float, y0: float, x1: float, y1: float, degrees: float) -> list[float]:
    """Flat corners of the box rotated clockwise (as CVAT draws it) by ``degrees`` about its centre.

    Kept unclipped beside the clipped envelope: masks and upright crops need the true outline.
    """
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    turned = [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in corners]
    return [v for point in turned for v in point]


def ellipse_box(cx: float, cy: float, rx: float, ry: float, degrees: float) -> Box:
    """Axis-aligned bounds of the (rotated) ellipse."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    ex, ey = math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)
    return (cx - ex, cy - ey, cx + ex, cy + ey)


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, degrees: float) -> list[float]:
    """Flat 32-vertex outline of the (rotated) ellipse, for masks."""
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1).ravel().tolist()


def points_box(flat: list[float]) -> Box:
    xs, ys = flat[0::2], flat[1::2]
    return (min(xs), min(ys), max(xs), max(ys))


def finish(shape: Shape, width: int, height: int, out: ParsedExport) -> Shape | None:
    """Clip ``shape.box`` to the image; None (counted) when less than a pixel is left."""
    x0, y0, x1, y1 = shape.box
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        out.skipped[DEGENERATE] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        out.notes[CLIPPED] += 1
        shape.box = (cx0, cy0, cx1, cy1)
    return shape


def bitmap_shape(bitmap: np.ndarray, left: int, top: int, **fields) -> Shape | None:
    """A mask shape cropped to its set pixels; None when no pixel is set."""
    rows, cols = np.flatnonzero(bitmap.any(axis=1)), np.flatnonzero(bitmap.any(axis=0))
    if not rows.size:
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    x0, y0 = left + c0, top + r0
    box = (float(x0), float(y0), float(left + c1), float(top + r1))
    crop = np.ascontiguousarray(bitmap[r0:r1, c0:c1], dtype=bool)
    return Shape(kind="mask", box=box, mask=crop, mask_origin=(x0, y0), **fields)


def merge_groups(shapes: list[Shape], width: int, height: int, out: ParsedExport) -> list[Shape]:
    """Shapes sharing a CVAT group id become one object, as CVAT's COCO export merges them.

    The largest part gives the label; boxes give the box when the group has any, else the union
    of all parts; masks or ellipses make the object a mask of the union, polygons are kept.
    """
    groups: dict[int, list[Shape]] = {}
    for shape in shapes:
        if shape.group:
            groups.setdefault(shape.group, []).append(shape)
    if not any(len(parts) > 1 for parts in groups.values()):
        return shapes
    merged: list[Shape] = []
    for shape in shapes:
        parts = groups.get(shape.group, [shape])
        if len(parts) == 1:
            merged.append(shape)
        elif shape is parts[0]:  # the group takes the place of its first part
            merged.append(_merge(parts, shape.group, width, height))
            out.notes[GROUPED] += 1
    return merged


def _merge(parts: list[Shape], gid: int, width: int, height: int) -> Shape:
    leader = max(parts, key=lambda s: (s.box[2] - s.box[0]) * (s.box[3] - s.box[1]))
    boxes = [s.box for s in parts if s.kind == "rectangle"] or [s.box for s in parts]
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes))
    box += (max(b[2] for b in boxes), max(b[3] for b in boxes))
    common = {"label": leader.label, "occluded": leader.occluded, "group": gid}
    common["attributes"] = leader.attributes
    if any(s.kind in ("mask", "ellipse") for s in parts):
        union = np.zeros((height, width), dtype=bool)
        for s in parts:
            if s.kind != "rectangle":
                union |= s.to_mask(width, height)
        shape = bitmap_shape(union, 0, 0, **common)
        if shape is not None:
            shape.box = box
            return shape
    rings = [ring for s in parts if s.polygons for ring in s.polygons]
    kind = "polygon" if rings else "rectangle"
    return Shape(kind=kind, box=box, polygons=rings or None, **common)
