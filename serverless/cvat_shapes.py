"""Detections → the JSON shapes CVAT's lambda manager reads from a detector function.

Everything returned is a plain Python value (str, float, int, list, dict): ``json.dumps`` would
stringify numpy scalars silently or fail on them. Rectangles carry ``[xtl, ytl, xbr, ybr]``; masks
carry CVAT's ``mask`` layout (row-major 0/255 bitmap of the inclusive box crop, then the box) and a
flat ``points`` polygon that CVAT uses when the user converts masks to polygons. ``confidence`` is a
string, as CVAT's own functions return it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serverless.detector import Detections
from serverless.mask_polygon import TOLERANCE, mask_to_polygon

#: Decimals kept in coordinates: sub-pixel precision without bloating the response.
DECIMALS = 2


def to_cvat_shapes(det: Detections, tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """One CVAT shape per detection, highest score first. A mask detection whose bitmap is
    empty (its box survived the score threshold but no pixel passed 0.5) has nothing to draw and
    is left out, as CVAT's own mask functions do."""
    shapes = []
    for i, label in enumerate(det.labels):
        confidence = str(round(float(det.scores[i]), 4))
        if det.masks:
            shape = mask_shape(det.masks[i], det.mask_boxes[i], tolerance)
            if shape is None:
                continue
        else:
            points = [round(float(v), DECIMALS) for v in det.boxes[i]]
            shape = {"type": "rectangle", "points": points}
        shapes.append({"label": label, **shape, "confidence": confidence, "attributes": []})
    return shapes


def mask_shape(
    bitmap: np.ndarray, box: tuple[int, int, int, int], tolerance: float = TOLERANCE
) -> dict[str, Any] | None:
    """``type``/``mask``/``points`` of a bool bitmap covering the inclusive image box ``box``;
    None when the bitmap is empty."""
    xtl, ytl, xbr, ybr = (int(v) for v in box)
    if bitmap.shape != (ybr - ytl + 1, xbr - xtl + 1):
        raise ValueError(f"mask bitmap of shape {bitmap.shape} does not cover its box {box}")
    polygon = mask_to_polygon(bitmap, tolerance)
    if not polygon:
        return None
    offsets = [xtl, ytl] * (len(polygon) // 2)
    return {
        "type": "mask",
        "mask": [*(np.asarray(bitmap, dtype=np.uint8) * 255).ravel().tolist(), xtl, ytl, xbr, ybr],
        "points": [p + o for p, o in zip(polygon, offsets, strict=True)],
    }
