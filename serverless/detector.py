"""The detector every serving path shares: Nuclio handler, cvat-sdk function, CLI predict, crops.

Loads a bundle once, keeps images uint8 until they reach the device, normalises there, and runs
under ``inference_mode`` (with autocast on GPU). Returns plain numpy results in source-image pixels.

Large frames: when the bundle sets ``tile_size``, a frame larger than one tile also goes through
the network as overlapping tiles, and the windows' detections are merged by :mod:`serverless.tiling`
(in numpy, the same code as the torch-free CPU engine, :mod:`serverless.engine`). A frame that does
not fit in GPU memory is retried in tiles, then on the CPU, so one huge frame never fails a whole task.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from serverless.bundle import BundleInfo, load_model
from serverless.detections import Detections
from serverless.errors import DeviceError
from serverless.tiling import Part, Window, frame_windows, inclusive_box, merge, window_part

log = logging.getLogger(__name__)

#: Windows (tiles and the full frame) sent through the network together.
TILE_BATCH = 4
#: Tile side for the out-of-memory retry when the bundle sets none.
OOM_TILE = 1024
#: Frames up to this many bytes go to the GPU through a reused pinned buffer.
STAGING_BYTES = 64 << 20


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


class Detector:
    """A loaded bundle ready to detect objects in decoded RGB uint8 images."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.info: BundleInfo
        self.info, self.model = load_model(bundle_dir, self.device)
        self.bundle_dir = Path(bundle_dir)
        self.info.check_tiles(f"{self.bundle_dir}/model.json")
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
        return self.info.score_floors(threshold)

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
    ) -> list[Part]:
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
    ) -> list[Part]:
        """Run ``model`` on the whole frame (if ``full_frame``) and, when larger, on its tiles."""
        h, w = image.shape[:2]
        frame = self._upload(image, device)
        windows = frame_windows(w, h, tile, self.info.tile_overlap, full_frame)
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

    def _merge(self, parts: list[Part]) -> Detections:
        """Merge the windows' detections (one window: as they are), highest score first."""
        return merge(parts, self.labels, self.info.detections_per_img)


def _part(
    output: dict[str, torch.Tensor], window: Window, size: tuple[int, int], floors: np.ndarray
) -> Part:
    """Keep one window's detections above their class thresholds in frame pixels
    (:func:`serverless.tiling.window_part`), and crop their masks while those are still on the device."""
    part, keep = window_part(
        output["boxes"].float().cpu().numpy(),
        output["scores"].float().cpu().numpy(),
        output["labels"].cpu().numpy(),
        window,
        size,
        floors,
    )
    if "masks" in output:
        part.mask_boxes = [inclusive_box(box, window) for box in part.boxes]
        part.masks = [
            _crop_mask(output["masks"][k, 0], box, window)
            for k, box in zip(keep.tolist(), part.mask_boxes, strict=True)
        ]
    return part


def _crop_mask(soft: torch.Tensor, box: tuple[int, int, int, int], window: Window) -> np.ndarray:
    """A window's soft mask binarised inside ``box`` (inclusive, frame pixels)."""
    x0, y0 = window[:2]
    xa, ya, xb, yb = box
    return (soft[ya - y0 : yb - y0 + 1, xa - x0 : xb - x0 + 1] >= 0.5).cpu().numpy()
