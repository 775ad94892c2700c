"""The detector every serving path shares: Nuclio handler, cvat-sdk function, CLI predict, crops.

Loads a bundle once, keeps images uint8 until they reach the device, normalises there, and runs under
``inference_mode`` (with autocast on GPU). Returns plain numpy results in source-image pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from serverless.bundle import BundleInfo, load_model

log = logging.getLogger(__name__)


@dataclass
class Detections:
    """Detections of one image, sorted by score (highest first)."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in image pixels
    scores: np.ndarray  # (N,) float32
    labels: list[str]
    #: For mask models: per detection, a bool bitmap of its inclusive integer box (see ``mask_boxes``).
    masks: list[np.ndarray] = field(default_factory=list)
    mask_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means the GPU when one is visible, the CPU otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is visible to PyTorch")
    return torch.device(device)


class Detector:
    """A loaded bundle ready to detect objects in decoded RGB uint8 images."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.info: BundleInfo
        self.info, self.model = load_model(bundle_dir, self.device)
        self.bundle_dir = Path(bundle_dir)
        self._autocast = self.device.type == "cuda"
        self._amp_dtype = (
            torch.bfloat16
            if self._autocast and torch.cuda.is_bf16_supported()
            else torch.float16
        )

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def has_masks(self) -> bool:
        return self.info.shape_type == "mask"

    def warmup(self, size: tuple[int, int] = (480, 640)) -> None:
        """Run one dummy frame so the first real request does not pay for lazy initialisation."""
        self.detect(np.zeros((*size, 3), dtype=np.uint8))

    def thresholds(self, threshold: float | None) -> np.ndarray:
        """Per-class score thresholds: the caller's for every class, else the calibrated ones."""
        if threshold is not None:
            return np.full(len(self.labels), float(threshold), dtype=np.float32)
        per_class = self.info.class_thresholds
        return np.array(
            [per_class.get(name, self.info.threshold) for name in self.labels], dtype=np.float32
        )

    @torch.inference_mode()
    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detections:
        """Detect objects in an HxWx3 uint8 RGB image."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        tensor = tensor.to(self.device, non_blocking=True).float().div_(255.0)
        with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._autocast):
            output = self.model([tensor])[0]
        return self._postprocess(output, self.thresholds(threshold), image.shape[:2])

    def _postprocess(
        self, output: dict[str, torch.Tensor], thresholds: np.ndarray, hw: tuple[int, int]
    ) -> Detections:
        classes = output["labels"].cpu().numpy().astype(np.int64)
        scores = output["scores"].float().cpu().numpy()
        valid = (classes >= 1) & (classes <= len(self.labels))
        keep = valid & (scores >= thresholds[np.clip(classes - 1, 0, len(self.labels) - 1)])
        order = np.argsort(-scores[keep], kind="stable")
        idx = np.flatnonzero(keep)[order]
        boxes = output["boxes"].float().cpu().numpy()[idx].astype(np.float32)
        h, w = hw
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        det = Detections(
            boxes=boxes,
            scores=scores[idx].astype(np.float32),
            labels=[self.labels[c - 1] for c in classes[idx]],
        )
        if "masks" in output and len(idx):
            self._crop_masks(det, output["masks"][torch.as_tensor(idx, device=self.device)], hw)
        return det

    @staticmethod
    def _crop_masks(det: Detections, masks: torch.Tensor, hw: tuple[int, int]) -> None:
        """Binarise Mask R-CNN's soft masks and keep each one's inclusive box crop."""
        h, w = hw
        binary = (masks[:, 0] >= 0.5).cpu().numpy()
        for i, (x1, y1, x2, y2) in enumerate(det.boxes):
            box = (
                int(min(max(np.floor(x1), 0), w - 1)),
                int(min(max(np.floor(y1), 0), h - 1)),
                int(min(max(np.ceil(x2) - 1, 0), w - 1)),
                int(min(max(np.ceil(y2) - 1, 0), h - 1)),
            )
            box = (box[0], box[1], max(box[2], box[0]), max(box[3], box[1]))
            det.mask_boxes.append(box)
            det.masks.append(binary[i, box[1] : box[3] + 1, box[0] : box[2] + 1])
