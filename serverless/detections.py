"""What a detector returns for one image, and every conversion of it that consumers read.

Torch-free, so that the CPU engine (:mod:`serverless.engine`), the CVAT shapes and the evaluation
share it with the PyTorch detector without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serverless.mask_polygon import TOLERANCE, mask_to_polygon


@dataclass
class Detections:
    """Detections of one image, sorted by score (highest first), and their conversions: every
    consumer (CVAT JSON, cvat-sdk shapes, COCO results, evaluation, crops) reads them through
    these methods."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in image pixels
    scores: np.ndarray  # (N,) float32
    labels: list[str]
    #: Mask models: per detection, a bool bitmap of its inclusive integer box (``mask_boxes``).
    masks: list[np.ndarray] = field(default_factory=list)
    mask_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def drawable(self) -> list[int]:
        """Indices of the detections with something to draw: every box; a mask only when some
        pixel passed 0.5 (a box can survive the score threshold while its mask vanishes)."""
        if not self.masks:
            return list(range(len(self)))
        return [i for i, bitmap in enumerate(self.masks) if bitmap.any()]

    def full_mask(self, i: int, hw: tuple[int, int]) -> np.ndarray:
        """Detection ``i``'s mask pasted into an ``hw`` (height, width) bool frame."""
        full = np.zeros(hw, dtype=bool)
        x1, y1 = self.mask_boxes[i][:2]
        bitmap = self.masks[i]
        full[y1 : y1 + bitmap.shape[0], x1 : x1 + bitmap.shape[1]] = bitmap
        return full

    def polygon(self, i: int, tolerance: float = TOLERANCE) -> list[float]:
        """Flat outline of mask ``i`` (its largest component) in image pixels; [] when empty."""
        polygon = mask_to_polygon(self.masks[i], tolerance)
        x1, y1 = self.mask_boxes[i][:2]
        return [v + (x1 if k % 2 == 0 else y1) for k, v in enumerate(polygon)]

    def coco_annotation(self, i: int, hw: tuple[int, int], category_id: int) -> dict[str, Any]:
        """Detection ``i`` as a COCO result: bbox [x, y, w, h], score, and RLE when it has a mask."""
        x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
        ann: dict[str, Any] = {
            "category_id": category_id,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "score": float(self.scores[i]),
            "iscrowd": 0,
        }
        if self.masks:
            from faster_coco_eval.core import mask as mask_utils

            rle = mask_utils.encode(np.asfortranarray(self.full_mask(i, hw), dtype=np.uint8))
            ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            ann["area"] = float(mask_utils.area(rle))
        return ann
