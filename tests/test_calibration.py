"""Threshold calibration: the best-F1 cut on cases where the right cut is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.evaluation.calibration import FALLBACK_THRESHOLD, MIN_CLASS_MATCHES, calibrate_thresholds

LABELS = ["cell", "debris"]


def target(boxes, labels, scores=None) -> dict:
    out = {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}
    if scores is not None:
        out["scores"] = np.asarray(scores, float)
    return out


def box(i: int) -> list[float]:
    """The i-th of a row of disjoint 30-pixel boxes."""
    return [i * 40.0, 0.0, i * 40.0 + 30.0, 30.0]


def test_threshold_separates_true_from_false_positives():
    # Image 1: two objects found (0.9, 0.7) and a false alarm (0.6) on empty background.
    # Image 2: one object found (0.8), a duplicate of it (0.3) and a false alarm (0.2).
    gts = [target([box(0), box(1)], [1, 1]), target([box(0)], [1])]
    preds = [
        target([box(0), box(1), box(5)], [1, 1, 1], [0.9, 0.7, 0.6]),
        target([box(0), box(0), box(6)], [1, 1, 1], [0.8, 0.3, 0.2]),
    ]
    cal = calibrate_thresholds(gts, preds, LABELS, min_matches=1)
    assert 0.6 < cal.threshold <= 0.7
    assert (cal.f1, cal.precision, cal.recall) == (1.0, 1.0, 1.0)
    assert cal.class_thresholds == {"cell": cal.threshold}
    kept = [cal.select(p) for p in preds]
    assert [k["scores"].tolist() for k in kept] == [[0.9, 0.7], [0.8]]
    # At threshold 0 the duplicate is a false positive: greedy matching uses each object once.
    assert cal.pooled.precision[-1] == pytest.approx(3 / 6)
    assert cal.pooled.recall[-1] == 1.0


def test_per_class_thresholds_follow_each_class():
    # "cell" is confident (true 0.9, false 0.5); "debris" is shy (true 0.4, false 0.1).
    gts = [target([box(0), box(1)], [1, 2])]
    preds = [target([box(0), box(3), box(1), box(4)], [1, 1, 2, 2], [0.9, 0.5, 0.4, 0.1])]
    cal = calibrate_thresholds(gts, preds, LABELS, min_matches=1)
    assert 0.5 < cal.class_thresholds["cell"] <= 0.9
    assert 0.1 < cal.class_thresholds["debris"] <= 0.4
    assert cal.select(preds[0])["scores"].tolist() == [0.9, 0.4]
    summary = cal.to_dict()["per_class"]
    assert summary["debris"]["f1"] == 1.0 and summary["debris"]["gt"] == 1


def test_a_class_needs_enough_matched_objects_for_its_own_threshold():
    # "cell": 5 objects, all found at 0.9, false alarms at 0.5 -> own threshold in (0.5, 0.9].
    # "debris": 4 objects found at 0.3, false alarms at 0.2: too few for its own threshold.
    gts = [target([box(i) for i in range(9)], [1] * 5 + [2] * 4)]
    boxes = [box(i) for i in range(9)] + [box(20 + i) for i in range(9)]
    scores = [0.9] * 5 + [0.3] * 4 + [0.5] * 5 + [0.2] * 4
    preds = [target(boxes, [1] * 5 + [2] * 4 + [1] * 5 + [2] * 4, scores)]
    cal = calibrate_thresholds(gts, preds, LABELS)
    assert MIN_CLASS_MATCHES == 5 and list(cal.class_thresholds) == ["cell"]
    assert 0.5 < cal.class_thresholds["cell"] <= 0.9
    # pooled: keeping >= 0.3 gives 9 TP / 14 kept (F1 0.78) > keeping >= 0.9 (5/5, F1 0.71)
    assert 0.2 < cal.threshold <= 0.3 and cal.threshold_for("debris") == cal.threshold
    assert cal.per_class["debris"].matched == 4 and cal.per_class["cell"].matched == 5
    assert "for debris (fewer than 5 matched" in cal.applied() and "cell 0." in cal.applied()
    assert cal.to_dict()["min_class_matches"] == 5


def test_overlap_below_iou_is_not_a_match():
    gts = [target([box(0)], [1])]
    shifted = np.asarray(box(0)) + np.array([15, 0, 15, 0])  # IoU 15/45 = 0.33
    cal = calibrate_thresholds(gts, [target([shifted], [1], [0.9])], LABELS)
    assert cal.f1 == 0.0 and cal.threshold == FALLBACK_THRESHOLD
    assert cal.class_thresholds == {}
    loose = calibrate_thresholds(gts, [target([shifted], [1], [0.9])], LABELS, iou=0.3)
    assert loose.f1 == 1.0


def test_wrong_class_is_not_a_match():
    cal = calibrate_thresholds([target([box(0)], [1])], [target([box(0)], [2], [0.9])], LABELS)
    assert cal.f1 == 0.0


def test_equal_scores_are_kept_or_dropped_together():
    gts = [target([box(0)], [1])]
    preds = [target([box(0), box(2)], [1, 1], [0.8, 0.8])]
    cal = calibrate_thresholds(gts, preds, LABELS)
    assert len(cal.pooled.thresholds) == 1
    assert cal.f1 == pytest.approx(2 / 3) and cal.threshold == 0.8


def test_no_predictions_and_no_objects():
    empty = target(np.zeros((0, 4)), [], [])
    cal = calibrate_thresholds(
        [target([box(0)], [1]), target(np.zeros((0, 4)), [])], [empty] * 2, LABELS
    )
    assert cal.threshold == FALLBACK_THRESHOLD and cal.f1 == 0.0
    assert cal.to_dict()["per_class"]["cell"] == {
        "threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0, "gt": 1
    }  # fmt: skip
    json.dumps(cal.to_dict(), allow_nan=False)


def test_bad_class_ids_are_refused():
    with pytest.raises(ValueError, match=r"class ids must be in 1\.\.2"):
        calibrate_thresholds([target([box(0)], [3])], [target([box(0)], [1], [0.5])], LABELS)
