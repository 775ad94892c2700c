"""What to annotate next: unannotated frames ranked by how much a human label on them would teach.

Each frame goes through the model twice, as it is and mirrored left-right, keeping every detection
down to :data:`SCORE_FLOOR`. Two signals say the model is unsure about it:

- **uncertainty**: detections whose score lies near their class's calibrated threshold (the cut
  that decides what a user sees), each weighted ``1 - |score - threshold| / BAND``, summed;
- **disagreement**: what the mirrored view does not confirm: for detections that could be kept
  (score >= threshold - BAND), the score difference of each pair matched across the two views
  (same label, IoU >= 0.5), plus the whole score of an unmatched one, summed.

Their sum is the frame's *informativeness*. Diversity comes from the model's own backbone: its
feature maps (FPN levels), averaged over space and L2-normalised, describe each frame; frames are
picked greedily by ``value x novelty^diversity``, where value is the informativeness (scaled to
the largest, plus a small floor so that a frame unlike anything picked can still win) and novelty
is the cosine distance to the nearest frame already picked (scaled to the largest remaining).
Ten near-identical uncertain frames therefore yield one early pick, not ten.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from serverless.bundle import atomic_write
from serverless.imageio import ImageDecodeError
from trainer.inference import detect_each

if TYPE_CHECKING:
    from pathlib import Path

    from serverless.detector import Detections, Detector

T = TypeVar("T")

#: Detections are scored from this score up (torchvision's own box_score_thresh).
SCORE_FLOOR = 0.05
#: A detection this close to its class threshold is uncertain (weight falling linearly to 0).
BAND = 0.25
#: Two detections of one label overlapping this much in the two views are the same object.
MATCH_IOU = 0.5
#: Share of the highest informativeness every frame gets, so novelty alone can win a pick.
VALUE_FLOOR = 0.1
#: Frames picked one by one for diversity; the rest follow in their last priority.
GREEDY_LIMIT = 2000
#: Columns of the ranked CSV.
COLUMNS = ("rank", "task", "frame", "image", "priority", "informativeness", "uncertainty",
           "disagreement", "novelty", "detections")  # fmt: skip


@dataclass
class FrameScore:
    """What the model says about one frame."""

    uncertainty: float
    disagreement: float
    detections: int  # above their class threshold (what a user would see)
    feature: np.ndarray | None  # L2-normalised pooled backbone features

    @property
    def informativeness(self) -> float:
        return self.uncertainty + self.disagreement


@dataclass
class Suggestion:
    """One frame in the ranking."""

    rank: int
    item: Any
    score: FrameScore
    novelty: float  # cosine distance to the nearest frame ranked before, scaled to [0, 1]
    priority: float  # value x novelty^diversity when it was picked


class BackboneFeatures:
    """Records the pooled backbone output of the first network call after each :meth:`take`
    (the whole frame: tiles come after it in the same batch)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.vector: np.ndarray | None = None
        self._taken = True
        backbone = getattr(model, "backbone", None)
        self._handle = backbone.register_forward_hook(self._hook) if backbone is not None else None

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        if not self._taken:
            return
        maps = list(output.values()) if isinstance(output, dict) else [output]
        pooled = torch.cat([m[0].float().mean(dim=(-2, -1)).flatten() for m in maps])
        vector = pooled.cpu().numpy().astype(np.float64)
        self.vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        self._taken = False

    def take(self) -> np.ndarray | None:
        vector, self.vector, self._taken = self.vector, None, True
        return vector

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def score_frames(
    detector: Detector,
    items: list[T],
    read: Callable[[T], np.ndarray],
    threshold: float | None = None,
    *,
    progress: bool = True,
) -> Iterator[tuple[T, FrameScore | ImageDecodeError]]:
    """Score each item's frame (see the module docstring); an unreadable frame comes back as its
    ImageDecodeError. ``threshold`` replaces the calibrated class thresholds."""
    cut = dict(zip(detector.labels, detector.thresholds(threshold).tolist(), strict=True))
    features = BackboneFeatures(detector.model)
    try:
        features.take()
        detected = detect_each(detector, items, read, SCORE_FLOOR)
        for item, image, det in tqdm(detected, total=len(items), unit="frame", disable=not progress):
            if det is None:
                yield item, image
                continue
            feature = features.take()
            mirrored = unflip(detector.detect(np.ascontiguousarray(image[:, ::-1]), SCORE_FLOOR),
                              image.shape[1])  # fmt: skip
            features.take()
            yield item, frame_score(det, mirrored, cut, feature)
    finally:
        features.close()


def frame_score(
    det: Detections, mirrored: Detections, cut: dict[str, float], feature: np.ndarray | None
) -> FrameScore:
    """Uncertainty of both views (averaged) and their disagreement."""
    uncertainty = (near_threshold(det, cut) + near_threshold(mirrored, cut)) / 2
    shown = sum(1 for s, label in zip(det.scores, det.labels, strict=True) if s >= cut[label])
    return FrameScore(uncertainty, disagreement(det, mirrored, cut), shown, feature)


def near_threshold(det: Detections, cut: dict[str, float]) -> float:
    """Sum over detections of ``max(0, 1 - |score - threshold| / BAND)``."""
    if not len(det):
        return 0.0
    thresholds = np.array([cut[label] for label in det.labels])
    return float(np.clip(1 - np.abs(det.scores - thresholds) / BAND, 0, None).sum())


def disagreement(a: Detections, b: Detections, cut: dict[str, float]) -> float:
    """Score mass of the candidate detections (>= threshold - BAND) the other view does not
    confirm: |score difference| of matched pairs plus the score of each unmatched one."""
    keep_a = [i for i in range(len(a)) if a.scores[i] >= cut[a.labels[i]] - BAND]
    keep_b = [j for j in range(len(b)) if b.scores[j] >= cut[b.labels[j]] - BAND]
    free, total = set(keep_b), 0.0
    for i in keep_a:  # a is sorted by score: greedy matching, highest first
        best, best_iou = None, MATCH_IOU
        for j in free:
            if b.labels[j] == a.labels[i] and (iou := _iou(a.boxes[i], b.boxes[j])) >= best_iou:
                best, best_iou = j, iou
        if best is None:
            total += float(a.scores[i])
        else:
            free.discard(best)
            total += abs(float(a.scores[i]) - float(b.scores[best]))
    return total + sum(float(b.scores[j]) for j in free)


def unflip(det: Detections, width: int) -> Detections:
    """Detections of a left-right mirrored frame, in the original frame's coordinates."""
    from serverless.detector import Detections

    boxes = det.boxes.copy()
    boxes[:, [0, 2]] = width - det.boxes[:, [2, 0]]
    return Detections(boxes=boxes, scores=det.scores, labels=list(det.labels))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def rank(scored: list[tuple[T, FrameScore]], diversity: float = 1.0) -> list[Suggestion]:
    """Greedy ranking by ``value x novelty^diversity`` (see the module docstring);
    ``diversity`` 0 ranks by informativeness alone."""
    if not scored:
        return []
    info = np.array([s.informativeness for _, s in scored])
    top = float(info.max())
    floor = VALUE_FLOOR * top if top > 0 else 1.0
    value = (info + floor) / (top + floor)
    feats = _feature_matrix([s for _, s in scored])
    distance = np.full(len(scored), np.inf)  # to the nearest pick so far
    left = np.ones(len(scored), dtype=bool)
    picked: list[tuple[int, float, float]] = []  # (index, novelty, priority) when picked
    while left.any():
        novelty = _novelty(distance, left)
        priority = value * novelty**diversity
        if len(picked) == GREEDY_LIMIT:  # the rest in their current priority
            rest = np.flatnonzero(left)[np.argsort(-priority[left], kind="stable")]
            picked += [(int(i), float(novelty[i]), float(priority[i])) for i in rest]
            break
        i = int(np.flatnonzero(left)[np.argmax(priority[left])])
        picked.append((i, float(novelty[i]), float(priority[i])))
        left[i] = False
        distance = np.minimum(distance, 1.0 - feats @ feats[i])
    return [Suggestion(k + 1, scored[i][0], scored[i][1], n, p) for k, (i, n, p) in enumerate(picked)]


def _feature_matrix(scores: list[FrameScore]) -> np.ndarray:
    """One row per frame; a frame without features is a zero row (distance 1 to everything)."""
    dim = next((len(s.feature) for s in scores if s.feature is not None), 1)
    return np.stack([s.feature if s.feature is not None else np.zeros(dim) for s in scores])


def _novelty(distance: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Distances of the frames left scaled to [0, 1]; all 1 before the first pick."""
    if np.isinf(distance).all():
        return np.ones_like(distance)
    largest = float(distance[left].max()) if left.any() else 0.0
    return np.clip(distance / largest, 0.0, 1.0) if largest > 1e-12 else np.zeros_like(distance)


def write_csv(path: Path, ranking: Iterable[Suggestion], describe: Callable[[Any], tuple]) -> None:
    """The ranked CSV, atomically; ``describe(item)`` gives its (task, frame, image) cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for s in ranking:
        task, frame, image = describe(s.item)
        writer.writerow([s.rank, task, frame, image, f"{s.priority:.4f}",
                         f"{s.score.informativeness:.4f}", f"{s.score.uncertainty:.4f}",
                         f"{s.score.disagreement:.4f}", f"{s.novelty:.4f}", s.score.detections])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode("utf-8")))
