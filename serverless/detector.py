"""The detector every serving path shares: Nuclio handler, cvat-sdk function, CLI predict, crops.

Loads a bundle once, keeps images uint8 until they reach the device, normalises there, and runs
under ``inference_mode``, with the compute dtype :mod:`serverless.precision` chooses for the GPU.
Returns plain numpy results in source-image pixels. Each window's detections come back to the host
in one transfer (one synchronisation), masks in one more.

Large frames: when the bundle sets ``tile_size``, a frame larger than one tile also goes through
the network as overlapping tiles. A tile's box that touches a cut (a tile edge inside the frame) is
an object seen in part: it is dropped when an uncut box of its class covers most of it (the overlap
guarantees one for objects smaller than it; the full-frame pass finds the large ones). Cut boxes
that remain are fragments of an object larger than the overlap that no window saw whole (the
tile-only retry below has no full-frame pass): fragments of one class from two windows are one
object when they agree where both windows see the frame (:func:`_fragment_groups`), and are
replaced by their union. What remains is merged per class with :func:`torchvision.ops.batched_nms`.

Out of memory: a frame that does not fit in GPU memory is retried in tiles, then on the CPU, so
one huge frame never fails a whole task. Each retry runs after the failed attempt's tensors are
released: outside the ``except`` block, whose exception's traceback holds the frames of the
failed attempt and every tensor they reference.
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
from serverless.precision import PrecisionChoice, choose_precision

log = logging.getLogger(__name__)

#: Windows (tiles and the full frame) sent through the network together.
TILE_BATCH = 4
#: Two detections of one class from different windows overlapping more than this are one object.
MERGE_IOU = 0.5
#: A cut box this much inside an uncut box of its class is a part of that object.
PART_INSIDE = 0.5
#: Two fragments are one object when, inside both windows, their extents overlap this much per axis.
FRAGMENT_IOU = 0.5
#: Tile side for the out-of-memory retry when the bundle sets none.
OOM_TILE = 1024
#: Frames up to this many bytes go to the GPU through a reused pinned buffer.
STAGING_BYTES = 64 << 20

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in frame pixels
#: What :meth:`Detector.detect` takes: HxWx3 uint8 RGB array, or a 3xHxW uint8 tensor (any device).
Frame = np.ndarray | torch.Tensor


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

    window: Window
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
    """A loaded bundle ready to detect objects in decoded RGB uint8 images.

    ``precision``: one of :data:`serverless.precision.MODES` (``auto`` by default).
    """

    def __init__(self, bundle_dir: str | Path, device: str = "auto", precision: str = "auto") -> None:
        self.device = pick_device(device)
        self.precision: PrecisionChoice = choose_precision(self.device, precision)
        self.info: BundleInfo
        self.info, self.model = load_model(bundle_dir, self.device)
        self.bundle_dir = Path(bundle_dir)
        tile, overlap = self.info.tile_size, self.info.tile_overlap
        if tile is not None and not 0 <= overlap < tile:
            raise BundleError(
                f"{self.bundle_dir}/model.json: tile_overlap must be >= 0 and smaller than "
                f"tile_size ({tile}), got {overlap}"
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
    def detect(self, image: Frame, threshold: float | None = None) -> Detections:
        """Detect objects in an HxWx3 uint8 RGB array or a 3xHxW uint8 tensor."""
        floors = self.thresholds(threshold)
        parts = self._attempt(image, floors, self.info.tile_size, True)
        if parts is None:  # out of memory, and the attempt's tensors are released by now
            parts = self._after_oom(image, floors)
        return self._merge(parts)

    def _attempt(
        self, image: Frame, floors: np.ndarray, tile: int | None, full_frame: bool
    ) -> list[_Part] | None:
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

    def _after_oom(self, image: Frame, floors: np.ndarray) -> list[_Part]:
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
    ) -> list[_Part]:
        """Run ``model`` on the whole frame (if ``full_frame``) and, when larger, on its tiles."""
        h, w = frame_size(image)
        frame = self._upload(image, device)
        windows: list[Window] = [(0, 0, w, h)] if full_frame else []
        if tile and max(h, w) > tile:
            windows += tile_windows(w, h, tile, self.info.tile_overlap)
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
        array = torch.from_numpy(np.ascontiguousarray(image))
        if device.type == "cuda" and array.numel() <= STAGING_BYTES:
            if self._staging is None:
                self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            array = self._staging[: array.numel()].view(array.shape).copy_(array)
        return array.to(device, non_blocking=True).permute(2, 0, 1)

    def _merge(self, parts: list[_Part]) -> Detections:
        """Merge the windows' detections (one window: as they are), highest score first."""
        boxes = torch.cat([p.boxes for p in parts])
        scores = torch.cat([p.scores for p in parts])
        classes = torch.cat([p.classes for p in parts])
        masks = None if parts[0].masks is None else [m for p in parts for m in p.masks or []]
        mask_boxes = [b for p in parts for b in p.mask_boxes]
        if len(parts) > 1:
            boxes, scores, classes, idx = _merge_windows(parts, boxes, scores, classes, masks, mask_boxes)
            idx = idx[: self.info.detections_per_img]
        else:
            idx = torch.sort(scores, descending=True, stable=True).indices
        order = idx.tolist()
        det = Detections(
            boxes=boxes[idx].numpy(),
            scores=scores[idx].numpy(),
            labels=[self.labels[c - 1] for c in classes[idx].tolist()],
        )
        if masks is not None:
            det.masks = [masks[i] for i in order]
            det.mask_boxes = [mask_boxes[i] for i in order]
        return det


def frame_size(image: Frame) -> tuple[int, int]:
    """(height, width) of an HxWx3 array or a 3xHxW tensor."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else image.shape[:2]


def _part(
    output: dict[str, torch.Tensor], window: Window, size: tuple[int, int], floors: np.ndarray
) -> _Part:
    """Keep one window's detections above their class thresholds, move them to frame pixels, mark
    the ones its cuts go through, and crop their masks while those are still on the device.

    Boxes, scores and labels come to the host as one tensor: one synchronisation per window."""
    x0, y0, x1, y1 = window
    w, h = size
    rows = torch.cat(
        [output["boxes"].float(), output["scores"].float()[:, None], output["labels"].float()[:, None]], 1
    ).cpu()
    classes = rows[:, 5].long()
    n = len(floors)
    floor = torch.from_numpy(floors)[(classes - 1).clamp(0, n - 1)]
    keep = torch.nonzero((classes >= 1) & (classes <= n) & (rows[:, 4] >= floor)).flatten()
    boxes = rows[keep, :4] + torch.tensor([x0, y0, x0, y0]).float()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(x0, x1)  # inside the window, so inside the frame
    boxes[:, 1::2] = boxes[:, 1::2].clamp(y0, y1)
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    for coord, edge, inside in ((0, x0, x0 > 0), (1, y0, y0 > 0), (2, x1, x1 < w), (3, y1, y1 < h)):
        if inside:  # within a pixel of a window edge that is not the frame's
            cut |= (boxes[:, coord] - edge).abs() <= 1.0
    part = _Part(window, boxes, rows[keep, 4].contiguous(), classes[keep], cut, None, [])
    if "masks" in output:
        part.masks, part.mask_boxes = _crop_masks(output["masks"], keep, boxes.numpy(), window)
    return part


def _merge_windows(
    parts: list[_Part],
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    masks: list[np.ndarray] | None,
    mask_boxes: list[tuple[int, int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several windows' detections as one set (module docstring): cut boxes inside an uncut box of
    their class dropped, an object's fragments joined (rows appended), then per-class NMS. Returns
    the boxes, scores and classes with the joined rows, and the indices kept, highest score first."""
    idx = torch.arange(len(scores))
    cut = torch.cat([p.cut for p in parts])
    windows = torch.cat([torch.tensor([p.window] * len(p.scores), dtype=torch.float32).reshape(-1, 4)
                         for p in parts])
    pieces = idx[cut][~_covered(boxes, classes, idx[cut], idx[~cut])]
    groups = [g for g in _fragment_groups(boxes, classes, windows, pieces) if len(g) > 1]
    grouped = {i for g in groups for i in g}
    singles = torch.tensor([i for i in pieces.tolist() if i not in grouped], dtype=torch.long)
    boxes, scores, classes = _join(boxes, scores, classes, groups, masks, mask_boxes)
    idx = torch.cat([idx[~cut], singles, torch.arange(len(idx), len(scores))])
    return boxes, scores, classes, idx[batched_nms(boxes[idx], scores[idx], classes[idx], MERGE_IOU)]


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


def _fragment_groups(
    boxes: torch.Tensor, classes: torch.Tensor, windows: torch.Tensor, pieces: torch.Tensor
) -> list[list[int]]:
    """Cut boxes ``pieces`` grouped into objects (indices into ``boxes``).

    Two windows see the same pixels where they overlap, so two fragments of one object, cut by
    the windows' edges, cover the same part of that overlap. Fragments ``a`` and ``b`` of one
    class from different windows are one object when, clipped to the windows' intersection
    (grown by a pixel, so that windows that only touch share their edge), both are non-empty and
    their extents agree on each axis: interval IoU >= :data:`FRAGMENT_IOU`, except across an
    intersection at most 2 px wide (windows that touch), where reaching it is agreeing. Two
    neighbouring objects of one class each fill their own part of the overlap and stay apart.
    Grouping is transitive, so an object across many tiles becomes one group."""
    n = len(pieces)
    if n < 2:
        return [[i] for i in pieces.tolist()]
    b, win = boxes[pieces], windows[pieces]
    lo = torch.maximum(win[:, None, :2], win[None, :, :2]) - 1  # (n, n, 2): the shared region
    hi = torch.minimum(win[:, None, 2:], win[None, :, 2:]) + 1
    a_lo, a_hi = torch.maximum(b[:, None, :2], lo), torch.minimum(b[:, None, 2:], hi)
    b_lo, b_hi = torch.maximum(b[None, :, :2], lo), torch.minimum(b[None, :, 2:], hi)
    inter = (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0)
    union = (torch.maximum(a_hi, b_hi) - torch.minimum(a_lo, b_lo)).clamp(min=1e-6)
    agree = ((inter / union >= FRAGMENT_IOU) | (hi - lo <= 4)) & (a_hi > a_lo) & (b_hi > b_lo)
    same = (classes[pieces][:, None] == classes[pieces][None]) & (win[:, None] != win[None]).any(-1)
    linked = agree.all(-1) & same
    group = list(range(n))  # union-find over the links

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in torch.nonzero(linked).tolist():
        group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i, index in enumerate(pieces.tolist()):
        members.setdefault(root(i), []).append(index)
    return list(members.values())


def _join(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    groups: list[list[int]],
    masks: list[np.ndarray] | None,
    mask_boxes: list[tuple[int, int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``boxes``, ``scores``, ``classes`` with one row appended per group: the fragments' union box,
    best score and class; ``masks`` and ``mask_boxes`` get the union of the fragments' masks."""
    if not groups:
        return boxes, scores, classes
    new_boxes = torch.stack([torch.cat([boxes[g, :2].amin(0), boxes[g, 2:].amax(0)]) for g in groups])
    new_scores = torch.stack([scores[g].max() for g in groups])
    new_classes = torch.stack([classes[g[0]] for g in groups])
    if masks is not None:
        for g in groups:
            bitmap, box = _union_mask([masks[i] for i in g], [mask_boxes[i] for i in g])
            masks.append(bitmap)
            mask_boxes.append(box)
    return (torch.cat([boxes, new_boxes]), torch.cat([scores, new_scores]),
            torch.cat([classes, new_classes]))


def _union_mask(
    bitmaps: list[np.ndarray], boxes: list[tuple[int, int, int, int]]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Bitmaps of inclusive boxes pasted together into their union box."""
    xa, ya = min(b[0] for b in boxes), min(b[1] for b in boxes)
    xb, yb = max(b[2] for b in boxes), max(b[3] for b in boxes)
    union = np.zeros((yb - ya + 1, xb - xa + 1), dtype=bool)
    for bitmap, (x, y, _, _) in zip(bitmaps, boxes, strict=True):
        union[y - ya : y - ya + bitmap.shape[0], x - xa : x - xa + bitmap.shape[1]] |= bitmap
    return union, (xa, ya, xb, yb)


def _crop_masks(
    soft: torch.Tensor, keep: torch.Tensor, boxes: np.ndarray, window: Window
) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The kept detections' soft masks (N x 1 x H x W, window pixels) binarised inside the
    inclusive integer boxes (frame pixels) of ``boxes``, brought to the host in one transfer."""
    inclusive = [_inclusive(box, window) for box in boxes]
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


def _inclusive(box: np.ndarray, window: Window) -> tuple[int, int, int, int]:
    """The inclusive integer box (frame pixels) of a float box, inside ``window``."""
    x0, y0, x1, y1 = window
    xa = int(min(max(np.floor(box[0]), x0), x1 - 1))
    ya = int(min(max(np.floor(box[1]), y0), y1 - 1))
    xb = max(int(min(np.ceil(box[2]) - 1, x1 - 1)), xa)
    yb = max(int(min(np.ceil(box[3]) - 1, y1 - 1)), ya)
    return xa, ya, xb, yb
