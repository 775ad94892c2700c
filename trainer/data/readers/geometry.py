"""Geometry shared by the readers: every CVAT shape becomes an axis-aligned box inside the image.

Detectors train on axis-aligned boxes: rotated boxes and ellipses are replaced by their envelope,
shapes partly outside the image are clipped, and shapes with less than a pixel inside are dropped.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.data.readers.parsed import CLIPPED, DEGENERATE, ParsedExport
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


def rotated_box(x0: float, y0: float, x1: float, y1: float, degrees: float, **fields) -> Shape:
    """A CVAT box rotated by ``degrees``: trained on its envelope, its true corners kept."""
    ring = rotated_corners(x0, y0, x1, y1, degrees)
    box = rotated_envelope(x0, y0, x1, y1, degrees)
    return Shape(kind="rectangle", box=box, rotation=degrees, polygons=[ring], **fields)


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
    """Clip ``shape.box`` to the image; None (counted) when less than a pixel is left or a
    coordinate is not a finite number."""
    x0, y0, x1, y1 = shape.box
    if not all(map(math.isfinite, shape.box)):  # "nan" or "inf" in the export
        out.skip(DEGENERATE, shape.label)
        return None
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        out.skip(DEGENERATE, shape.label)
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


def ellipse_bitmap(
    cx: float, cy: float, rx: float, ry: float, degrees: float, width: int, height: int, **fields
) -> Shape | None:
    """The ellipse as the mask CVAT's COCO export makes of it, or None when no pixel is inside.

    CVAT's ``EllipsesToMasks`` (cvat/apps/dataset_manager/formats/transformations.py) draws
    ``cv2.ellipse(mat, (round(cx), round(cy)), (round(rx), round(ry)), angle=rotation, 0, 360,
    255, thickness=-1)``: the pixels whose integer coordinates lie in the ellipse with rounded
    centre and axes, turned clockwise (y down) by ``rotation``. OpenCV fills a many-sided polygon,
    so a boundary pixel may differ; the extents agree.
    """
    x0, y0, ax, ay = round(cx), round(cy), max(round(rx), 0.5), max(round(ry), 0.5)
    reach = math.ceil(max(ax, ay))
    left, top = max(x0 - reach, 0), max(y0 - reach, 0)
    right, bottom = min(x0 + reach, width - 1), min(y0 + reach, height - 1)
    if right < left or bottom < top:
        return None
    dy, dx = np.mgrid[top - y0 : bottom - y0 + 1, left - x0 : right - x0 + 1].astype(np.float64)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    u, v = dx * c + dy * s, -dx * s + dy * c  # back into the ellipse's own axes
    inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0 + 1e-9
    shape = bitmap_shape(inside, left, top, **fields)
    if shape is not None:
        shape.kind = "ellipse"
    return shape
