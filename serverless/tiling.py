"""Large frames in windows, and the merge of the windows' detections, in numpy.

Both detectors share this: the PyTorch one (:mod:`serverless.detector`) and the torch-free CPU engine
(:mod:`serverless.engine`), so a tiled frame is merged by one piece of code whichever ran the network.

When the bundle sets ``tile_size``, a frame larger than one tile also goes through the network as
overlapping tiles. A tile's box that touches a cut (a tile edge inside the frame) is an object seen in
part: it is dropped when an uncut box of its class covers most of it (the overlap guarantees one for
objects smaller than it; the full-frame pass finds the large ones). Cut boxes that remain are fragments
of an object larger than the overlap that no window saw whole (a tile-only retry has no full-frame
pass): fragments of one class from two windows are one object when they agree where both windows see
the frame (:func:`fragment_groups`), and are replaced by their union. What remains is merged per class
with :func:`batched_nms`, which keeps exactly what :func:`torchvision.ops.batched_nms` keeps, in the
same order (float32 arithmetic, the same per-size strategy; tests/test_tiling.py checks it against
torchvision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from serverless.detections import Detections

#: Two detections of one class from different windows overlapping more than this are one object.
MERGE_IOU = 0.5
#: A cut box this much inside an uncut box of its class is a part of that object.
PART_INSIDE = 0.5
#: Two fragments are one object when, inside both windows, their extents overlap this much per axis.
FRAGMENT_IOU = 0.5
#: torchvision's batched_nms runs one NMS per class above this many box coordinates (on the CPU),
#: and one NMS over class-offset boxes up to it; the offsets change the float32 IoUs slightly.
VANILLA_NMS_NUMEL = 4000

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in frame pixels
MaskBox = tuple[int, int, int, int]  # inclusive integer box of a mask bitmap, frame pixels


@dataclass
class Part:
    """One window's detections above their class thresholds, in frame pixels."""

    window: Window
    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    classes: np.ndarray  # (N,) int64, 1-based
    cut: np.ndarray  # (N,) bool: the box touches a window edge that lies inside the frame
    masks: list[np.ndarray] | None = None  # mask models: bool bitmap of each inclusive box
    mask_boxes: list[MaskBox] = field(default_factory=list)


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


def frame_windows(width: int, height: int, tile: int | None, overlap: int, full_frame: bool) -> list[Window]:
    """The full frame (if ``full_frame``) and, when it is larger than a tile, its tiles."""
    windows: list[Window] = [(0, 0, width, height)] if full_frame else []
    if tile and max(width, height) > tile:
        windows += tile_windows(width, height, tile, overlap)
    return windows


def window_part(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    window: Window,
    size: tuple[int, int],
    floors: np.ndarray,
) -> tuple[Part, np.ndarray]:
    """One window's detections (window pixels) above their class ``floors``, moved to frame pixels
    (``size`` is the frame's width, height) and clamped to the window, the ones its cuts go through
    marked. Returns the part (without masks) and the indices of the kept detections."""
    x0, y0, x1, y1 = window
    w, h = size
    classes = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    n = len(floors)
    floor = floors[np.clip(classes - 1, 0, n - 1)]
    keep = np.flatnonzero((classes >= 1) & (classes <= n) & (scores >= floor))
    kept = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep] + np.array([x0, y0, x0, y0], np.float32)
    kept[:, 0::2] = np.clip(kept[:, 0::2], x0, x1)  # inside the window, so inside the frame
    kept[:, 1::2] = np.clip(kept[:, 1::2], y0, y1)
    cut = np.zeros(len(kept), dtype=bool)
    for coord, edge, inside in ((0, x0, x0 > 0), (1, y0, y0 > 0), (2, x1, x1 < w), (3, y1, y1 < h)):
        if inside:  # within a pixel of a window edge that is not the frame's
            cut |= np.abs(kept[:, coord] - edge) <= 1.0
    return Part(window, kept, scores[keep], classes[keep], cut), keep


def inclusive_box(box: np.ndarray, window: Window) -> MaskBox:
    """The inclusive integer box (frame pixels) of a float box, inside ``window``."""
    x0, y0, x1, y1 = window
    xa = int(min(max(np.floor(box[0]), x0), x1 - 1))
    ya = int(min(max(np.floor(box[1]), y0), y1 - 1))
    xb = max(int(min(np.ceil(box[2]) - 1, x1 - 1)), xa)
    yb = max(int(min(np.ceil(box[3]) - 1, y1 - 1)), ya)
    return xa, ya, xb, yb


def merge(parts: list[Part], labels: list[str], limit: int) -> Detections:
    """The windows' detections as one image's (one window: as they are), highest score first, at
    most ``limit`` of them when several windows were merged."""
    boxes = np.concatenate([p.boxes for p in parts]).reshape(-1, 4)
    scores = np.concatenate([p.scores for p in parts])
    classes = np.concatenate([p.classes for p in parts])
    masks = None if parts[0].masks is None else [m for p in parts for m in p.masks or []]
    mask_boxes = [b for p in parts for b in p.mask_boxes]
    idx = np.arange(len(scores))
    if len(parts) > 1:
        cut = np.concatenate([p.cut for p in parts])
        windows = np.array([p.window for p in parts for _ in range(len(p.scores))], np.float32).reshape(-1, 4)
        pieces = idx[cut][~covered(boxes, classes, idx[cut], idx[~cut])]
        joined = [g for g in fragment_groups(boxes, classes, windows, pieces) if len(g) > 1]
        in_groups = {i for g in joined for i in g}
        singles = np.array([i for i in pieces.tolist() if i not in in_groups], dtype=np.int64)
        boxes, scores, classes = _join(boxes, scores, classes, joined, masks, mask_boxes)
        fused = np.arange(len(idx), len(scores))
        idx = np.concatenate([idx[~cut], singles, fused])
        idx = idx[batched_nms(boxes[idx], scores[idx], classes[idx], MERGE_IOU)][:limit]
    else:
        idx = np.argsort(-scores, kind="stable")
    names = [labels[c - 1] for c in classes[idx].tolist()]
    det = Detections(boxes=boxes[idx], scores=scores[idx], labels=names)
    if masks is not None:
        det.masks = [masks[i] for i in idx.tolist()]
        det.mask_boxes = [mask_boxes[i] for i in idx.tolist()]
    return det


def covered(boxes: np.ndarray, classes: np.ndarray, parts: np.ndarray, wholes: np.ndarray) -> np.ndarray:
    """For each cut box ``parts[i]``: does it lie mostly inside an uncut box of its class?"""
    if not len(parts) or not len(wholes):
        return np.zeros(len(parts), dtype=bool)
    a, b = boxes[parts][:, None], boxes[wholes][None]
    lo, hi = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
    inter = np.maximum(hi - lo, 0).prod(-1)
    area = np.maximum(a[..., 2:] - a[..., :2], np.float32(1e-6)).prod(-1)
    same = classes[parts][:, None] == classes[wholes][None]
    return ((inter / area >= PART_INSIDE) & same).any(1)


def fragment_groups(
    boxes: np.ndarray, classes: np.ndarray, windows: np.ndarray, pieces: np.ndarray
) -> list[list[int]]:
    """Cut boxes ``pieces`` grouped into objects (indices into ``boxes``; ``windows`` holds each
    box's window, float32).

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
    lo = np.maximum(win[:, None, :2], win[None, :, :2]) - 1  # (n, n, 2): the shared region
    hi = np.minimum(win[:, None, 2:], win[None, :, 2:]) + 1
    a_lo, a_hi = np.maximum(b[:, None, :2], lo), np.minimum(b[:, None, 2:], hi)
    b_lo, b_hi = np.maximum(b[None, :, :2], lo), np.minimum(b[None, :, 2:], hi)
    inter = np.maximum(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0)
    union = np.maximum(np.maximum(a_hi, b_hi) - np.minimum(a_lo, b_lo), np.float32(1e-6))
    agree = ((inter / union >= FRAGMENT_IOU) | (hi - lo <= 4)) & (a_hi > a_lo) & (b_hi > b_lo)
    same = (classes[pieces][:, None] == classes[pieces][None]) & (win[:, None] != win[None]).any(-1)
    linked = agree.all(-1) & same
    group = list(range(n))  # union-find over the links

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in np.argwhere(linked).tolist():
        group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i, index in enumerate(pieces.tolist()):
        members.setdefault(root(i), []).append(index)
    return list(members.values())


def _join(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    groups: list[list[int]],
    masks: list[np.ndarray] | None,
    mask_boxes: list[MaskBox],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``boxes``, ``scores``, ``classes`` with one row appended per group: the fragments' union box,
    best score and class; ``masks`` and ``mask_boxes`` get the union of the fragments' masks."""
    if not groups:
        return boxes, scores, classes
    new_boxes = np.stack([np.concatenate([boxes[g, :2].min(0), boxes[g, 2:].max(0)]) for g in groups])
    new_scores = np.array([scores[g].max() for g in groups], dtype=np.float32)
    new_classes = np.array([classes[g[0]] for g in groups], dtype=np.int64)
    if masks is not None:
        for g in groups:
            bitmap, box = union_mask([masks[i] for i in g], [mask_boxes[i] for i in g])
            masks.append(bitmap)
            mask_boxes.append(box)
    return (
        np.concatenate([boxes, new_boxes]),
        np.concatenate([scores, new_scores]),
        np.concatenate([classes, new_classes]),
    )


def union_mask(bitmaps: list[np.ndarray], boxes: list[MaskBox]) -> tuple[np.ndarray, MaskBox]:
    """Bitmaps of inclusive boxes pasted together into their union box."""
    xa, ya = min(b[0] for b in boxes), min(b[1] for b in boxes)
    xb, yb = max(b[2] for b in boxes), max(b[3] for b in boxes)
    union = np.zeros((yb - ya + 1, xb - xa + 1), dtype=bool)
    for bitmap, (x, y, _, _) in zip(bitmaps, boxes, strict=True):
        union[y - ya : y - ya + bitmap.shape[0], x - xa : x - xa + bitmap.shape[1]] |= bitmap
    return union, (xa, ya, xb, yb)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by NMS done independently per category ``idxs``, highest score first: what
    :func:`torchvision.ops.batched_nms` returns on the CPU for the same float32 inputs."""
    if boxes.size > VANILLA_NMS_NUMEL:
        keep = np.zeros(len(scores), dtype=bool)
        for category in np.unique(idxs):
            members = np.flatnonzero(idxs == category)
            keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = np.flatnonzero(keep)
        return kept[np.argsort(-scores[kept], kind="stable")]
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = idxs.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS as torchvision's CPU kernel computes it: a stable descending sort by score, float32
    IoUs (``inter / (area_i + area_j - inter)``) compared in float64 with ``> iou_threshold``."""
    boxes = np.asarray(boxes, dtype=np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    zero = np.float32(0)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for empty boxes: NaN, never > t
        for i in order:
            if suppressed[i]:
                continue
            keep.append(i)
            w = np.maximum(zero, np.minimum(x2[i], x2) - np.maximum(x1[i], x1))
            h = np.maximum(zero, np.minimum(y2[i], y2) - np.maximum(y1[i], y1))
            inter = w * h
            suppressed |= (inter / (areas[i] + areas - inter)).astype(np.float64) > iou_threshold
    return np.array(keep, dtype=np.int64)
