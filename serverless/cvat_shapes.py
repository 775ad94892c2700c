"""Detections → the JSON shapes CVAT's lambda manager reads from a detector function.

Everything returned is a plain Python value (str, float, int, list, dict): ``json.dumps`` would
stringify numpy scalars silently or fail on them. Rectangles carry ``[xtl, ytl, xbr, ybr]``; masks
carry CVAT's ``mask`` layout (row-major 0/255 bitmap of the inclusive box crop, then the box) and a
flat ``points`` polygon that CVAT uses when the user converts masks to polygons. ``confidence`` is a
string, as CVAT's own functions return it (CVAT drops it); the score that survives in CVAT is the
attribute of :mod:`serverless.score_attribute`, when the function is packaged with one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serverless.detections import Detections
from serverless.mask_polygon import TOLERANCE
from serverless.score_attribute import ScoreAttribute

#: Decimals kept in coordinates: sub-pixel precision without bloating the response.
DECIMALS = 2


def to_cvat_shapes(
    det: Detections, tolerance: float = TOLERANCE, score: ScoreAttribute | None = None
) -> list[dict[str, Any]]:
    """One CVAT shape per drawable detection (:meth:`Detections.drawable`), highest score first;
    an empty mask has nothing to draw and is left out, as CVAT's own mask functions do. With
    ``score``, each shape carries its score as that attribute."""
    shapes = []
    for i in det.drawable():
        if det.masks:
            shape = mask_shape(det.masks[i], det.mask_boxes[i], det.polygon(i, tolerance))
        else:
            shape = {"type": "rectangle", "points": [round(float(v), DECIMALS) for v in det.boxes[i]]}
        confidence = str(round(float(det.scores[i]), 4))
        attributes = [score.value(det.scores[i])] if score else []
        shapes.append({"label": det.labels[i], **shape, "confidence": confidence, "attributes": attributes})
    return shapes


def mask_shape(
    bitmap: np.ndarray, box: tuple[int, int, int, int], polygon: list[float] | None = None
) -> dict[str, Any]:
    """``type``/``mask``/``points`` of a bool bitmap covering the inclusive image box ``box``, with
    its outline ``polygon`` in image pixels."""
    xtl, ytl, xbr, ybr = (int(v) for v in box)
    if bitmap.shape != (ybr - ytl + 1, xbr - xtl + 1):
        raise ValueError(f"mask bitmap of shape {bitmap.shape} does not cover its box {box}")
    return {
        "type": "mask",
        "mask": [*(np.asarray(bitmap, dtype=np.uint8) * 255).ravel().tolist(), xtl, ytl, xbr, ybr],
        "points": list(polygon or []),
    }
