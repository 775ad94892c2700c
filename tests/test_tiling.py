"""The torch-free merge of windows: its NMS keeps what torchvision's keeps, in the same order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms

from serverless.tiling import VANILLA_NMS_NUMEL, Part, batched_nms, merge, nms, window_part


def _boxes(rng: np.random.Generator, n: int, extent: float = 400.0) -> np.ndarray:
    """Clustered float32 boxes (many overlaps), some duplicated, some empty or inverted."""
    centres = rng.uniform(0, extent, (max(n // 6, 1), 2))[rng.integers(0, max(n // 6, 1), n)]
    centres += rng.normal(0, 6, (n, 2))
    sizes = rng.uniform(2, 60, (n, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    empty = rng.random(n) < 0.05
    boxes[empty, 2:] = boxes[empty, :2]
    inverted = rng.random(n) < 0.02
    boxes[inverted] = boxes[inverted][:, [2, 3, 0, 1]]
    dup = rng.random(n) < 0.1
    boxes[dup] = boxes[rng.integers(0, n, int(dup.sum()))]
    return boxes


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 scores with many exact ties (rounded to a coarse grid)."""
    return np.round(rng.uniform(0, 1, n), 2).astype(np.float32)


def _torchvision(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> torch.Tensor:
    return tv_batched_nms(*(torch.from_numpy(a) for a in (boxes, scores, classes)), iou)


@pytest.mark.parametrize("n", [0, 1, 7, 150, VANILLA_NMS_NUMEL // 4])
@pytest.mark.parametrize("threshold", [0.5, 0.45, 0.7])
def test_batched_nms_keeps_what_torchvision_keeps_in_its_order(n, threshold):
    rng = np.random.default_rng(n * 100 + int(threshold * 100))
    boxes, scores = _boxes(rng, n), _scores(rng, n)
    classes = rng.integers(1, 4, n).astype(np.int64)
    expected = _torchvision(boxes, scores, classes, threshold)
    assert batched_nms(boxes, scores, classes, threshold).tolist() == expected.tolist()


@pytest.mark.parametrize("n", [1001, 2500])
def test_batched_nms_of_many_boxes_keeps_the_same_set_ordered_by_score(n):
    """Above VANILLA_NMS_NUMEL coordinates torchvision runs one NMS per class and orders the kept
    boxes with an unstable sort: the same boxes are kept, and equal scores may come in another order
    (here: by index)."""
    assert n * 4 > VANILLA_NMS_NUMEL
    rng = np.random.default_rng(n)
    boxes, scores = _boxes(rng, n), _scores(rng, n)
    classes = rng.integers(1, 4, n).astype(np.int64)
    expected = _torchvision(boxes, scores, classes, 0.5)
    got = batched_nms(boxes, scores, classes, 0.5)
    assert sorted(got.tolist()) == sorted(expected.tolist())
    assert scores[got].tolist() == scores[expected.numpy()].tolist()
    assert len(set(scores[got].tolist())) < len(got)  # ties were there to be ordered


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_torchvision_on_near_threshold_overlaps(seed):
    """Pairs of boxes whose IoU sits within float32 rounding of the threshold."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1000, (300, 2)).astype(np.float32)
    side = rng.uniform(10, 100, (300, 1)).astype(np.float32)
    a = np.concatenate([base, base + side], 1)
    shift = side / 3  # IoU of a box and itself shifted by a third of its side along x: exactly 0.5
    b = a + np.concatenate([shift, np.zeros_like(shift), shift, np.zeros_like(shift)], 1)
    boxes = np.concatenate([a, b]).astype(np.float32)
    scores = rng.uniform(0, 1, 600).astype(np.float32)
    expected = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5)
    assert nms(boxes, scores, 0.5).tolist() == expected.tolist()


def test_window_part_keeps_per_class_thresholds_and_marks_cuts():
    boxes = np.array([[0, 0, 10, 10], [90, 5, 100, 20], [40, 40, 50, 50], [1, 1, 2, 2]], np.float32)
    scores = np.array([0.9, 0.8, 0.3, 0.95], np.float32)
    labels = np.array([1, 2, 1, 3])  # class 3 is not one of the bundle's two labels
    floors = np.array([0.5, 0.7], np.float32)
    part, keep = window_part(boxes, scores, labels, (100, 0, 200, 100), (300, 100), floors)
    assert keep.tolist() == [0, 1]
    assert part.boxes.tolist() == [[100, 0, 110, 10], [190, 5, 200, 20]]
    assert part.cut.tolist() == [True, True]  # x=100 and x=200 are cuts inside a 300 px frame


def test_merge_of_one_window_sorts_by_score_keeping_tie_order():
    part = Part((0, 0, 50, 50), np.arange(12, dtype=np.float32).reshape(3, 4),
                np.array([0.5, 0.9, 0.5], np.float32), np.array([1, 2, 2]), np.zeros(3, bool))  # fmt: skip
    det = merge([part], ["a", "b"], limit=300)
    assert det.scores.tolist() == [pytest.approx(0.9), 0.5, 0.5]
    assert det.labels == ["b", "a", "b"] and det.boxes[:, 0].tolist() == [4, 0, 8]
