"""The detector every serving path shares: Nuclio handler, cvat-sdk function, CLI predict, crops.

Loads a bundle once, keeps images uint8 until they reach the device, normalises there, and runs
under ``inference_mode`` (with autocast on GPU). Returns plain numpy results in source-image pixels.

Large frames: when the bundle sets ``tile_size``, a frame larger than one tile also goes through
the network as overlapping tiles. A tile's box that touches a cut (a tile edge inside the frame) is
an object seen in part: it is dropped when an uncut box of its class covers most of it (the overlap
guarantees one for objects smaller than it; the full-frame pass finds the large ones). What remains
is merged per class with :func:`torchvision.ops.batched_nms`. A frame that does not fit in GPU
memory is retried in tiles, then on the CPU, so one huge frame never fails a whole task.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from serverless.bundle import BundleError, BundleInfo, load_model
from serverless.errors import DeviceError
from serverless.mask_polygon import TOLERANCE, mask_to_polygon

log = logging.getLogger(__name__)

#: Windows (tiles and the full frame) sent through the network together.
TILE_BATCH = 4
#: Two detections of one class from different windows overlapping more than this are one object.
MERGE_IOU = 0.5
#: A cut box this much inside an uncut box of its class is a part of that object.
PART_INSIDE = 0.5
#: Tile side for the out-of-memory retry when the bundle sets none.
OOM_TILE = 1024
#: Frames up to this many bytes go to the GPU through a reused pinned buffer.
STAGING_BYTES = 64 << 20

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in frame pixels


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


@dataclass
class _Part:
    """One window's detections above their class thresholds, in frame pixels, on the CPU."""

    boxes: torch.Tensor  # (N, 4) float32
    scores: torch.Tensor  # (N,) float32
    classes: torch.Tensor  # (N,) int64, 1-based
    cut: torch.Tensor  # (N,) bool: the box touches a window edge that lies inside the frame
    masks: list[np.ndarray] | None  # mask models: bool bitmap of each box's inclusive box
    mask_boxes: list[tuple[int, int, int, int]]


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means the GPU when one is visible, the CPU otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu or auto"
        )
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"--device {device}: expected auto, cpu, cuda or cuda:N ({exc})") from None
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return chosen


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Windows of at most ``tile`` px covering the frame, evenly spread so that neighbours overlap
    by at least ``overlap`` px: an object no larger than that lies whole inside one of them."""

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        n = math.ceil((size - overlap) / (tile - overlap))
        return [i * (size - tile) // (n - 1) for i in range(n)]

    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in starts(height)
        for x in starts(width)
    ]


class Detector:
    """A loaded bundle ready to detect objects in decoded RGB uint8 images."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.info: BundleInfo
        self.info, self.model = load_model(bundle_dir, self.device)
        self.bundle_dir = Path(bundle_dir)
        tile, overlap = self.info.tile_size, self.info.tile_overlap
        if tile is not None and not 0 <= overlap < tile:
            raise BundleError(
                f"{self.bundle_dir}/model.json: tile_overlap must be >= 0 and smaller than "
                f"tile_size ({tile}), got {overlap}"
            )
        self._autocast = self.device.type == "cuda"
        self._amp_dtype = (
            torch.bfloat16 if self._autocast and torch.cuda.is_bf16_supported() else torch.float16
        )
        self._staging: torch.Tensor | None = None  # pinned host buffer reused across requests
        self._cpu_model: torch.nn.Module | None = None  # loaded on the first GPU out-of-memory

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
        floors = self.thresholds(threshold)
        try:
            parts = self._infer(image, floors, self.model, self.device, self.info.tile_size, True)
        except torch.cuda.OutOfMemoryError as exc:
            parts = self._infer_after_oom(image, floors, exc)
        return self._merge(parts)

    def _infer_after_oom(
        self, image: np.ndarray, floors: np.ndarray, exc: Exception
    ) -> list[_Part]:
        """Retry a frame that did not fit: in tiles on the same device, then on the CPU."""
        h, w = image.shape[:2]
        tile = self.info.tile_size or OOM_TILE
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if max(h, w) > tile:
            log.warning("out of memory on a %dx%d frame; retrying in %d px tiles", w, h, tile)
            try:
                return self._infer(image, floors, self.model, self.device, tile, False)
            except torch.cuda.OutOfMemoryError as again:
                exc = again
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if self.device.type == "cpu":
            raise exc
        log.warning("out of GPU memory on a %dx%d frame; running it on the CPU", w, h)
        if self._cpu_model is None:
            self._cpu_model = load_model(self.bundle_dir, "cpu")[1]
        cpu = torch.device("cpu")
        return self._infer(image, floors, self._cpu_model, cpu, self.info.tile_size, True)

    def _infer(
        self,
        image: np.ndarray,
        floors: np.ndarray,
        model: torch.nn.Module,
        device: torch.device,
        tile: int | None,
        full_frame: bool,
    ) -> list[_Part]:
        """Run ``model`` on the whole frame (if ``full_frame``) and, when larger, on its tiles."""
        h, w = image.shape[:2]
        frame = self._upload(image, device)
        windows: list[Window] = [(0, 0, w, h)] if full_frame else []
        if tile and max(h, w) > tile:
            windows += tile_windows(w, h, tile, self.info.tile_overlap)
        autocast = device.type == "cuda" and self._autocast
        parts = []
        for i in range(0, len(windows), TILE_BATCH):
            batch = windows[i : i + TILE_BATCH]
            inputs = [frame[:, y0:y1, x0:x1].float().div_(255.0) for x0, y0, x1, y1 in batch]
            with torch.autocast(device.type, dtype=self._amp_dtype, enabled=autocast):
                outputs = model(inputs)
            for window, output in zip(batch, outputs, strict=True):
                parts.append(_part(output, window, (w, h), floors))
        return parts

    def _upload(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """The frame as a 3xHxW uint8 tensor on ``device``; GPU copies go through pinned memory."""
        array = torch.from_numpy(np.ascontiguousarray(image))
        if device.type == "cuda" and array.numel() <= STAGING_BYTES:
            if self._staging is None or self._staging.numel() < array.numel():
                self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            array = self._staging[: array.numel()].view(array.shape).copy_(array)
        return array.to(device, non_blocking=True).permute(2, 0, 1)

    def _merge(self, parts: list[_Part]) -> Detections:
        """Merge the windows' detections (one window: as they are), highest score first."""
        boxes = torch.cat([p.boxes for p in parts])
        scores = torch.cat([p.scores for p in parts])
        classes = torch.cat([p.classes for p in parts])
        idx = torch.arange(len(scores))
        if len(parts) > 1:
            cut = torch.cat([p.cut for p in parts])
            idx = torch.cat([idx[~cut], idx[cut][~_covered(boxes, classes, idx[cut], idx[~cut])]])
            idx = idx[batched_nms(boxes[idx], scores[idx], classes[idx], MERGE_IOU)]
            idx = idx[: self.info.detections_per_img]
        else:
            idx = torch.sort(scores, descending=True, stable=True).indices
        order = idx.tolist()
        det = Detections(
            boxes=boxes[idx].numpy(),
            scores=scores[idx].numpy(),
            labels=[self.labels[c - 1] for c in classes[idx].tolist()],
        )
        if parts[0].masks is not None:
            masks = [m for p in parts for m in p.masks or []]
            mask_boxes = [b for p in parts for b in p.mask_boxes]
            det.masks = [masks[i] for i in order]
            det.mask_boxes = [mask_boxes[i] for i in order]
        return det


def _part(
    output: dict[str, torch.Tensor], window: Window, size: tuple[int, int], floors: np.ndarray
) -> _Part:
    """Keep one window's detections above their class thresholds, move them to frame pixels, mark
    the ones its cuts go through, and crop their masks while those are still on the device."""
    x0, y0, x1, y1 = window
    w, h = size
    classes = output["labels"].cpu().long()
    scores = output["scores"].float().cpu()
    n = len(floors)
    floor = torch.from_numpy(floors)[(classes - 1).clamp(0, n - 1)]
    keep = torch.nonzero((classes >= 1) & (classes <= n) & (scores >= floor)).flatten()
    boxes = output["boxes"].float().cpu()[keep] + torch.tensor([x0, y0, x0, y0]).float()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(x0, x1)  # inside the window, so inside the frame
    boxes[:, 1::2] = boxes[:, 1::2].clamp(y0, y1)
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    for coord, edge, inside in ((0, x0, x0 > 0), (1, y0, y0 > 0), (2, x1, x1 < w), (3, y1, y1 < h)):
        if inside:  # within a pixel of a window edge that is not the frame's
            cut |= (boxes[:, coord] - edge).abs() <= 1.0
    part = _Part(boxes, scores[keep], classes[keep], cut, None, [])
    if "masks" in output:
        part.masks = []
        for k, box in zip(keep.tolist(), boxes.numpy(), strict=True):
            bitmap, inclusive = _crop_mask(output["masks"][k, 0], box, window)
            part.masks.append(bitmap)
            part.mask_boxes.append(inclusive)
    return part


def _covered(
    boxes: torch.Tensor, classes: torch.Tensor, parts: torch.Tensor, wholes: torch.Tensor
) -> torch.Tensor:
    """For each cut box ``parts[i]``: does it lie mostly inside an uncut box of its class?"""
    if not len(parts) or not len(wholes):
        return torch.zeros(len(parts), dtype=torch.bool)
    a, b = boxes[parts][:, None], boxes[wholes][None]
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).clamp(min=1e-6).prod(-1)
    same = classes[parts][:, None] == classes[wholes][None]
    return ((inter / area >= PART_INSIDE) & same).any(1)


def _crop_mask(
    soft: torch.Tensor, box: np.ndarray, window: Window
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A window's soft mask binarised inside the inclusive integer box (frame pixels) of ``box``."""
    x0, y0, x1, y1 = window
    xa = int(min(max(np.floor(box[0]), x0), x1 - 1))
    ya = int(min(max(np.floor(box[1]), y0), y1 - 1))
    xb = max(int(min(np.ceil(box[2]) - 1, x1 - 1)), xa)
    yb = max(int(min(np.ceil(box[3]) - 1, y1 - 1)), ya)
    crop = soft[ya - y0 : yb - y0 + 1, xa - x0 : xb - x0 + 1] >= 0.5
    return crop.cpu().numpy(), (xa, ya, xb, yb)
