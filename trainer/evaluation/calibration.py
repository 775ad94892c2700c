"""Score thresholds chosen on validation data: the cut that maximises F1 at IoU 0.5.

The bundle's default threshold (CVAT sends none unless the user sets one) and its per-class
thresholds come from here. Predictions are matched greedily in score order, per image and class, to
the unmatched ground-truth box they overlap most (IoU >= ``iou``). Because higher-scored predictions
are matched first, the matches of the detections kept at any threshold are the same as if the
lower-scored ones had never existed, so one matching pass yields the whole precision/recall curve.

A class gets its own threshold only with evidence: at least :data:`MIN_CLASS_MATCHES` of its
validation objects found (matched at any score). A threshold read off two or three objects is
noise; such classes use the pooled threshold, which every class's objects inform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

#: Used when the data give no evidence (no true positive at any threshold), and by runs without
#: validation images, which calibrate nothing.
FALLBACK_THRESHOLD = 0.5
#: Matched ground-truth objects a class needs on validation for a threshold of its own.
MIN_CLASS_MATCHES = 5


@dataclass
class Curve:
    """Precision, recall and F1 when keeping detections scoring >= each threshold (descending)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    gt: int  # ground-truth objects the recall is relative to

    @classmethod
    def from_matches(cls, scores: np.ndarray, tp: np.ndarray, gt: int) -> Curve:
        order = np.argsort(-scores, kind="stable")
        scores, tp = scores[order], tp[order]
        # Detections with equal scores are kept or dropped together: one point per distinct score.
        last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if len(scores) else []
        tps = np.cumsum(tp)[last].astype(np.float64)
        kept = np.asarray(last, dtype=np.float64) + 1
        precision = tps / np.maximum(kept, 1)
        recall = tps / gt if gt else np.zeros_like(tps)
        f1 = np.divide(
            2 * precision * recall,
            precision + recall,
            out=np.zeros_like(tps),
            where=precision + recall > 0,
        )
        return cls(scores[last], precision, recall, f1, gt)

    @property
    def matched(self) -> int:
        """Ground-truth objects found at the lowest threshold (each is matched at most once)."""
        return round(float(self.recall[-1]) * self.gt) if len(self.recall) else 0

    def best(self) -> tuple[float, int] | None:
        """(threshold, index) of the highest F1, or None when nothing is ever right.

        Every threshold between the chosen score and the next lower one keeps the same detections;
        the midpoint is taken so that slightly lower scores on new images still pass.
        """
        if not len(self.f1) or self.f1.max() <= 0:
            return None
        i = int(np.argmax(self.f1))  # first maximum: the highest threshold reaching it
        score = float(self.thresholds[i])
        if i + 1 < len(self.thresholds):
            score = (score + float(self.thresholds[i + 1])) / 2
        return score, i

    def summary(self) -> dict[str, Any]:
        """Threshold, F1, precision and recall at the best cut (None values when there is none)."""
        best = self.best()
        if best is None:
            return {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0, "gt": self.gt}
        threshold, i = best
        return {
            "threshold": threshold,
            "f1": float(self.f1[i]),
            "precision": float(self.precision[i]),
            "recall": float(self.recall[i]),
            "gt": self.gt,
        }


@dataclass
class Calibration:
    """The chosen thresholds and the curves they were read from."""

    labels: list[str]
    threshold: float  # pooled over classes
    f1: float
    precision: float
    recall: float
    #: Only classes with evidence (MIN_CLASS_MATCHES matched objects); others use ``threshold``.
    class_thresholds: dict[str, float]
    pooled: Curve
    per_class: dict[str, Curve] = field(default_factory=dict)
    iou: float = 0.5
    min_matches: int = MIN_CLASS_MATCHES

    def threshold_for(self, label: str) -> float:
        return self.class_thresholds.get(label, self.threshold)

    def applied(self) -> str:
        """Which threshold each class gets, in words: what a bundle calibrated like this applies."""
        own = [f"{name} {value:.3f}" for name, value in self.class_thresholds.items()]
        pooled = [name for name in self.labels if name not in self.class_thresholds]
        parts = [f"own thresholds for {', '.join(own)}"] if own else []
        if pooled:
            parts.append(
                f"the 'all' threshold {self.threshold:.3f} for {', '.join(pooled)} (fewer than "
                f"{self.min_matches} matched objects of the class)"
            )
        return "; ".join(parts)

    def select(self, pred: dict) -> dict:
        """The detections of one prediction dict that pass their class threshold."""
        thresholds = np.array([self.threshold_for(name) for name in self.labels])
        classes = np.asarray(pred["labels"], dtype=np.int64).reshape(-1)
        keep = np.asarray(pred["scores"]).reshape(-1) >= thresholds[classes - 1]
        return {
            key: value[keep]
            if isinstance(value, np.ndarray)
            else [item for item, kept in zip(value, keep, strict=True) if kept]
            for key, value in pred.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "iou": self.iou,
            "threshold": self.threshold,
            "f1": self.f1,
            "precision": self.precision,
            "recall": self.recall,
            "class_thresholds": dict(self.class_thresholds),
            "min_class_matches": self.min_matches,
            "per_class": {name: curve.summary() for name, curve in self.per_class.items()},
        }


def calibrate_thresholds(
    gts: list[dict], preds: list[dict], labels: list[str], *, iou: float = 0.5,
    min_matches: int = MIN_CLASS_MATCHES,
) -> Calibration:
    """Match ``preds`` to ``gts`` (dicts as in ``trainer.evaluation.metrics``) and pick thresholds;
    a class gets its own with at least ``min_matches`` matched objects."""
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images but {len(preds)} prediction images")
    scores, tp, classes, gt_counts = _match_all(gts, preds, len(labels), iou)
    per_class = {
        name: Curve.from_matches(scores[classes == k + 1], tp[classes == k + 1], int(gt_counts[k]))
        for k, name in enumerate(labels)
    }
    pooled = Curve.from_matches(scores, tp, int(gt_counts.sum()))
    summary = pooled.summary()
    class_thresholds = {}
    for name, curve in per_class.items():
        best = curve.best()
        if best is not None and curve.matched >= min_matches:
            class_thresholds[name] = best[0]
    return Calibration(
        labels=list(labels),
        threshold=summary["threshold"] if summary["threshold"] is not None else FALLBACK_THRESHOLD,
        f1=summary["f1"],
        precision=summary["precision"],
        recall=summary["recall"],
        class_thresholds=class_thresholds,
        pooled=pooled,
        per_class=per_class,
        iou=iou,
        min_matches=min_matches,
    )


def _match_all(
    gts: list[dict], preds: list[dict], num_classes: int, iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score, true-positive flag and class id of every prediction; ground-truth count per class."""
    scores, tps, classes = [np.zeros(0)], [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=np.int64)]
    gt_counts = np.zeros(num_classes, dtype=np.int64)
    for image, (gt, pred) in enumerate(zip(gts, preds, strict=True)):
        gt_boxes = np.asarray(gt["boxes"], dtype=np.float32).reshape(-1, 4)
        gt_classes = _class_ids(gt, num_classes, f"image {image} ground truth")
        boxes = np.asarray(pred["boxes"], dtype=np.float32).reshape(-1, 4)
        pred_classes = _class_ids(pred, num_classes, f"image {image} prediction")
        pred_scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        gt_counts += np.bincount(gt_classes - 1, minlength=num_classes)
        for cls in np.unique(pred_classes):
            mine = pred_classes == cls
            tps.append(_match(boxes[mine], pred_scores[mine], gt_boxes[gt_classes == cls], iou))
            scores.append(pred_scores[mine])
            classes.append(np.full(int(mine.sum()), cls))
    return np.concatenate(scores), np.concatenate(tps), np.concatenate(classes), gt_counts


def _class_ids(target: dict, num_classes: int, what: str) -> np.ndarray:
    classes = np.asarray(target["labels"], dtype=np.int64).reshape(-1)
    if len(classes) and (classes.min() < 1 or classes.max() > num_classes):
        raise ValueError(f"{what}: class ids must be in 1..{num_classes}")
    return classes


def _match(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou: float) -> np.ndarray:
    """True-positive flag per prediction (input order), greedy in descending score order."""
    tp = np.zeros(len(boxes), dtype=bool)
    if not len(gt_boxes):
        return tp
    overlaps = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).numpy()
    free = np.ones(len(gt_boxes), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    for i in order[overlaps[order].max(axis=1) >= iou]:  # the others can never match
        candidates = np.where(free, overlaps[i], -1.0)
        j = int(np.argmax(candidates))
        if candidates[j] >= iou:
            tp[i] = True
            free[j] = False
    return tp
