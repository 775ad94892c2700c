"""The detector every serving path shares: Nuclio handler, cvat-sdk function, CLI predict, crops.

Loads a bundle once, keeps images uint8 until they reach the device, normalises there, and runs
under ``inference_mode``, with the compute dtype :mod:`serverless.precision` chooses for the GPU.
Returns plain numpy results in source-image pixels. Each window's detections come back to the host
in one transfer (one synchronisation), masks in one more.

Large frames: when the bundle sets ``tile_size``, a frame larger than one tile also goes through
the network as overlapping tiles, and the windows' detections are merged by :mod:`serverless.tiling`
(in numpy: cut parts dropped, an object's fragments joined, per-class NMS), the same code as the
torch-free CPU engine (:mod:`serverless.engine`).

Out of memory: a frame that does not fit in GPU memory is retried in tiles, then on the CPU, so
one huge frame never fails a whole task. Each retry runs after the failed attempt's tensors are
released: outside the ``except`` block, whose exception's traceback holds the frames of the
failed attempt and every tensor they reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from serverless.bundle import BundleInfo, ServedBundle, load_model
from serverless.detections import Detections
from serverless.errors import DeviceError
from serverless.imageio import frame_size
from serverless.precision import PrecisionChoice, choose_precision
from serverless.tiling import Part, Window, frame_windows, inclusive_box, merge, window_part

log = logging.getLogger(__name__)

#: Windows (tiles and the full frame) sent through the network together.
TILE_BATCH = 4
#: Tile side for the out-of-memory retry when the bundle sets none.
OOM_TILE = 1024
#: Frames up to this many bytes go to the GPU through a reused pinned buffer.
STAGING_BYTES = 64 << 20

#: What :meth:`Detector.detect` takes: HxWx3 uint8 RGB array, or a 3xHxW uint8 tensor (any device).
Frame = np.ndarray | torch.Tensor


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


class Detector(ServedBundle):
    """A loaded bundle ready to detect objects in decoded RGB uint8 images.

    ``precision``: one of :data:`serverless.precision.MODES` (``auto`` by default).
    """

    def __init__(self, bundle_dir: str | Path, device: str = "auto", precision: str = "auto") -> None:
        self.device = pick_device(device)
        self.precision: PrecisionChoice = choose_precision(self.device, precision)
        self.info: BundleInfo
        self.info, self.model = load_model(bundle_dir, self.device)
        self.bundle_dir = Path(bundle_dir)
        self.info.check_tiles(f"{self.bundle_dir}/model.json")
        self._staging: torch.Tensor | None = None  # pinned host buffer reused across requests
        self._cpu_model: torch.nn.Module | None = None  # loaded on the first GPU out-of-memory

    @torch.inference_mode()
    def detect(self, image: Frame, threshold: float | None = None) -> Detections:
        """Detect objects in an HxWx3 uint8 RGB array or a 3xHxW uint8 tensor."""
        floors = self.thresholds(threshold)
        parts = self._attempt(image, floors, self.info.tile_size, True)
        if parts is None:  # out of memory, and the attempt's tensors are released by now
            parts = self._after_oom(image, floors)
        return self._merge(parts)

    def _attempt(
        self, image: Frame, floors: np.ndarray, tile: int | None, full_frame: bool
    ) -> list[Part] | None:
        """:meth:`_infer` with the detector's model, or None when the device ran out of memory.

        Returns None after the ``except`` block: inside it the exception's traceback keeps the
        failed attempt's frames, and with them its tensors, alive."""
        try:
            return self._infer(image, floors, self.model, self.device, tile, full_frame)
        except torch.cuda.OutOfMemoryError:
            pass
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back before the next try
        return None

    def _after_oom(self, image: Frame, floors: np.ndarray) -> list[Part]:
        """Retry a frame that did not fit: in tiles on the same device, then on the CPU (a CPU
        detector has nowhere further to go: its tiled try raises)."""
        h, w = frame_size(image)
        tile = self.info.tile_size or OOM_TILE
        on_gpu = self.device.type == "cuda"
        if max(h, w) > tile:
            log.warning("out of memory on a %dx%d frame; retrying in %d px tiles", w, h, tile)
            if not on_gpu:
                return self._infer(image, floors, self.model, self.device, tile, False)
            parts = self._attempt(image, floors, tile, False)
            if parts is not None:
                return parts
        if not on_gpu:
            raise torch.cuda.OutOfMemoryError(f"out of memory on a {w}x{h} frame, not larger than a tile")
        log.warning("out of GPU memory on a %dx%d frame; running it on the CPU", w, h)
        if self._cpu_model is None:
            self._cpu_model = load_model(self.bundle_dir, "cpu")[1]
        cpu = torch.device("cpu")
        return self._infer(image, floors, self._cpu_model, cpu, self.info.tile_size, True)

    def _infer(
        self,
        image: Frame,
        floors: np.ndarray,
        model: torch.nn.Module,
        device: torch.device,
        tile: int | None,
        full_frame: bool,
    ) -> list[Part]:
        """Run ``model`` on the whole frame (if ``full_frame``) and, when larger, on its tiles."""
        h, w = frame_size(image)
        frame = self._upload(image, device)
        windows = frame_windows(w, h, tile, self.info.tile_overlap, full_frame)
        parts = []
        for i in range(0, len(windows), TILE_BATCH):
            batch = windows[i : i + TILE_BATCH]
            inputs = [frame[:, y0:y1, x0:x1].float().div_(255.0) for x0, y0, x1, y1 in batch]
            outputs = self._forward(model, inputs, device)
            for window, output in zip(batch, outputs, strict=True):
                parts.append(_part(output, window, (w, h), floors))
        return parts

    def _forward(
        self, model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        """The one place the network runs: float [0, 1] CHW inputs → torchvision's outputs.

        Autocast applies on the GPU only; the CPU fallback computes in fp32."""
        precision = self.precision
        enabled = precision.autocast and device.type == "cuda"
        with torch.autocast(device.type, dtype=precision.dtype, enabled=enabled):
            return model(inputs)

    def _upload(self, image: Frame, device: torch.device) -> torch.Tensor:
        """The frame as a 3xHxW uint8 tensor on ``device``; GPU copies go through pinned memory.

        Reusing the staging buffer is safe: a detection waits for its outputs, which come after
        the copy, before the next frame is staged."""
        if isinstance(image, torch.Tensor):
            return image.to(device)
        array = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # read-only arrays are copied
        if device.type == "cuda" and array.numel() <= STAGING_BYTES:
            if self._staging is None:
                self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            array = self._staging[: array.numel()].view(array.shape).copy_(array)
        return array.to(device, non_blocking=True).permute(2, 0, 1)

    def _merge(self, parts: list[Part]) -> Detections:
        """Merge the windows' detections (one window: as they are), highest score first."""
        return merge(parts, self.labels, self.info.detections_per_img)


def _part(
    output: dict[str, torch.Tensor], window: Window, size: tuple[int, int], floors: np.ndarray
) -> Part:
    """One window's detections above their class thresholds in frame pixels, cut ones marked
    (:func:`serverless.tiling.window_part`), and their masks cropped while still on the device.

    Boxes, scores and labels come to the host as one tensor: one synchronisation per window."""
    rows = torch.cat(
        [output["boxes"].float(), output["scores"].float()[:, None], output["labels"].float()[:, None]], 1
    ).cpu().numpy()
    part, keep = window_part(rows[:, :4], rows[:, 4], rows[:, 5], window, size, floors)
    if "masks" in output:
        part.masks, part.mask_boxes = _crop_masks(output["masks"], keep, part.boxes, window)
    return part


def _crop_masks(
    soft: torch.Tensor, keep: np.ndarray, boxes: np.ndarray, window: Window
) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The kept detections' soft masks (N x 1 x H x W, window pixels) binarised inside the
    inclusive integer boxes (frame pixels) of ``boxes``, brought to the host in one transfer."""
    inclusive = [inclusive_box(box, window) for box in boxes]
    x0, y0 = window[:2]
    crops = [
        soft[k, 0, ya - y0 : yb - y0 + 1, xa - x0 : xb - x0 + 1] >= 0.5
        for k, (xa, ya, xb, yb) in zip(keep.tolist(), inclusive, strict=True)
    ]
    if not crops:
        return [], []
    flat = torch.cat([c.flatten() for c in crops]).cpu().numpy()
    bitmaps, start = [], 0
    for crop in crops:
        bitmaps.append(flat[start : start + crop.numel()].reshape(crop.shape))
        start += crop.numel()
    return bitmaps, inclusive
