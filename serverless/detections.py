"""What a detector returns for one image, and every conversion of it that consumers read.

Torch-free, so that the CPU engine (:mod:`serverless.engine`), the CVAT shapes and the evaluation
share it with the PyTorch detector without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serverless.mask_polygon import TOLERANCE, mask_to_polygon


@dataclass
class Detections:
    """Detections of one image, sorted by score (highest first), and their conversions: every
    consumer (CVAT JSON, cvat-sdk shapes, COCO results, evaluation, crops) reads them through
    these methods (COCO's RLE through trainer.inference.coco_annotation: faster-coco-eval is not
    in the function's image)."""

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
