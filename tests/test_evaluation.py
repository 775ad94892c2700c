"""COCO evaluation on hand-made ground truth and predictions whose right answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serverless.detector import Detections
from trainer.data.records import ImageRecord, Shape
from trainer.evaluation.calibration import calibrate_thresholds
from trainer.evaluation.metrics import evaluate_detections, predict_records, record_target
from trainer.evaluation.report import format_table, write_reports

LABELS = ["cell", "debris"]


def gt(boxes, labels, **extra) -> dict:
    return {
        "boxes": np.asarray(boxes, dtype=float).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=int),
        **extra,
    }


def pred(boxes, labels, scores=None, **extra) -> dict:
    target = gt(boxes, labels, **extra)
    target["scores"] = np.asarray(scores if scores is not None else [0.9] * len(target["labels"]))
    return target


def grid_boxes(n: int, step: float = 20.0, size: float = 15.0) -> np.ndarray:
    """n non-overlapping boxes on a grid (dense images: hundreds of cells)."""
    xy = np.stack(np.meshgrid(np.arange(25), np.arange(n // 25 + 1)), -1).reshape(-1, 2)[:n] * step
    return np.concatenate([xy, xy + size], axis=1).astype(float)


BOXES = [[10, 10, 50, 50], [60, 20, 100, 70], [5, 60, 40, 95]]
CLASSES = [1, 2, 1]


def test_perfect_predictions_score_one():
    gts = [gt(BOXES, CLASSES), gt(BOXES[:1], [2])]
    preds = [pred(BOXES, CLASSES, [0.9, 0.8, 0.7]), pred(BOXES[:1], [2])]
    result = evaluate_detections(gts, preds, LABELS)
    assert (result.mAP, result.mAP50, result.mAP75) == (1.0, 1.0, 1.0)
    assert result.per_class == {
        "cell": {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "gt": 2},
        "debris": {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "gt": 2},
    }
    assert result.images == 2 and result.detections == 4


def test_boxes_shifted_below_iou_half_score_zero():
    shifted = np.asarray(BOXES, dtype=float) + np.array(
        [25, 0, 25, 0]
    )  # IoU with the truth about 0.23
    result = evaluate_detections([gt(BOXES, CLASSES)], [pred(shifted, CLASSES)], LABELS)
    assert result.mAP50 == 0.0 and result.mAP == 0.0


def test_one_class_perfect_one_missed_averages_to_half():
    preds = [pred([BOXES[0], BOXES[2]], [1, 1])]  # every "cell" found, the "debris" missed
    result = evaluate_detections([gt(BOXES, CLASSES)], preds, LABELS)
    assert result.per_class["cell"]["AP"] == 1.0
    assert result.per_class["debris"]["AP"] == 0.0
    assert result.mAP == pytest.approx(0.5)


def test_per_area_buckets_follow_coco_area_ranges():
    """COCO's buckets by area in px²: small < 32², medium < 96², large. The small objects are missed,
    the medium and large found: AP50 0 / 1 / 1; an empty bucket is None."""
    small, medium, large = [0, 0, 20, 20], [100, 100, 160, 160], [200, 0, 320, 120]  # 400, 3600, 14400 px²
    truth = [gt([small, medium, large, [0, 200, 25, 225]], [1, 1, 2, 2])]  # and another small one (625)
    found = [pred([medium, large], [1, 2])]
    result = evaluate_detections(truth, found, LABELS)
    assert result.per_area == {"small": {"AP": 0.0, "AP50": 0.0, "gt": 2},
                               "medium": {"AP": 1.0, "AP50": 1.0, "gt": 1},
                               "large": {"AP": 1.0, "AP50": 1.0, "gt": 1}}
    only_large = evaluate_detections([gt([large], [2])], [pred([large], [2])], LABELS)
    assert only_large.per_area["small"] == {"AP": None, "AP50": None, "gt": 0}


def test_labels_offset_by_one_score_zero():
    """Right boxes with the wrong class ids must not count: evaluation is per class."""
    swapped = [2 if c == 1 else 1 for c in CLASSES]
    result = evaluate_detections([gt(BOXES, CLASSES)], [pred(BOXES, swapped)], LABELS)
    assert result.mAP == 0.0 and result.mAP50 == 0.0


def test_dense_image_counts_all_detections_up_to_max_dets():
    boxes = grid_boxes(250)
    scores = np.random.default_rng(0).permutation(250) / 250 + 0.001
    gts, preds = [gt(boxes, [1] * 250)], [pred(boxes, [1] * 250, scores)]
    assert evaluate_detections(gts, preds, LABELS).mAP == 1.0
    # COCO's default budget of 100 detections per image would miss most of this image.
    assert evaluate_detections(gts, preds, LABELS, max_dets=100).mAP < 0.5


def test_empty_predictions_and_images_without_objects():
    empty_pred = pred(np.zeros((0, 4)), [])
    result = evaluate_detections([gt(BOXES, CLASSES)], [empty_pred], LABELS)
    assert result.mAP == 0.0 and result.per_class["cell"]["AP"] == 0.0

    result = evaluate_detections([gt(np.zeros((0, 4)), [])], [pred(BOXES, CLASSES)], LABELS)
    assert result.mAP == 0.0
    assert result.per_class["cell"] == {"AP": None, "AP50": None, "AP75": None, "gt": 0}
    assert evaluate_detections([], [], LABELS).mAP == 0.0


def test_class_without_ground_truth_is_none_and_json_safe():
    result = evaluate_detections([gt(BOXES[:1], [1])], [pred(BOXES, CLASSES)], LABELS)
    assert result.per_class["debris"]["AP"] is None
    assert result.mAP == 1.0  # averaged over classes that have ground truth only
    json.dumps(result.to_dict(), allow_nan=False)


def test_segm_compares_masks_not_boxes():
    truth = np.zeros((2, 100, 120), dtype=bool)
    truth[0, 10:50, 10:50] = True
    truth[1, 20:70, 60:100] = True
    box = [[10, 10, 50, 50], [60, 20, 100, 70]]
    same = evaluate_detections(
        [gt(box, [1, 2], masks=truth)], [pred(box, [1, 2], masks=truth)], LABELS, iou_type="segm"
    )
    assert same.mAP == 1.0 and same.iou_type == "segm"
    wrong = np.zeros_like(truth)
    wrong[0, 10:15, 10:15] = True  # same boxes, masks covering a sliver of the object
    wrong[1, 20:25, 60:65] = True
    result = evaluate_detections(
        [gt(box, [1, 2], masks=truth)], [pred(box, [1, 2], masks=wrong)], LABELS, iou_type="segm"
    )
    assert result.mAP == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"class ids must be in 1\.\.2"):
        evaluate_detections([gt(BOXES, [0, 1, 2])], [pred(BOXES, CLASSES)], LABELS)
    with pytest.raises(ValueError, match="prediction images"):
        evaluate_detections([gt(BOXES, CLASSES)], [], LABELS)
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_detections([], [], LABELS, iou_type="keypoints")


class _Oracle:
    """A stand-in detector that returns every object of its record by label name."""

    def __init__(self, labels: list[str], records: list[ImageRecord]) -> None:
        self.labels = labels
        self._truth = iter(records)

    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detections:
        record = next(self._truth)
        shapes = [s for s in record.shapes if s.label in self.labels]
        boxes = np.array([s.box for s in shapes], dtype=np.float32).reshape(-1, 4)
        det = Detections(boxes, np.full(len(shapes), 0.9, np.float32), [s.label for s in shapes])
        for s in shapes:  # masks as the detector serves them: the bitmap of the inclusive box
            x1, y1, x2, y2 = (int(v) for v in s.box)
            full = s.to_mask(record.width, record.height)
            det.mask_boxes.append((x1, y1, x2 - 1, y2 - 1))
            det.masks.append(full[y1:y2, x1:x2])
        return det


def test_predict_records_maps_labels_by_name(tmp_path):
    """Data and model list labels in different orders; an id offset anywhere would score 0."""
    from PIL import Image

    records = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", (120, 100)).save(path)
        shapes = [
            Shape("debris", "rectangle", (10.0, 10.0, 40.0 + i, 40.0)),
            Shape("cell", "rectangle", (50.0, 20.0, 90.0, 80.0)),
            Shape("unknown", "rectangle", (0.0, 0.0, 20.0, 20.0)),
        ]
        records.append(ImageRecord("Validation", path.name, 120, 100, path, shapes))
    model_labels = ["cell", "debris", "absent"]
    gts, preds = predict_records(_Oracle(model_labels, records), records, progress=False)
    assert gts[0]["labels"].tolist() == [2, 1]  # "unknown" left out
    result = evaluate_detections(gts, preds, model_labels)
    assert result.mAP == 1.0
    assert result.per_class["absent"]["AP"] is None
    assert [result.per_class[n]["gt"] for n in model_labels] == [3, 3, 0]


def test_predict_records_with_masks_scores_segm(tmp_path):
    from PIL import Image

    path = tmp_path / "im.png"
    Image.new("RGB", (120, 100)).save(path)
    ring = [20.0, 20.0, 80.0, 20.0, 50.0, 90.0]  # a triangle: its mask is half its box
    shapes = [Shape("cell", "polygon", (20.0, 20.0, 80.0, 90.0), polygons=[ring])]
    records = [ImageRecord("Validation", "im.png", 120, 100, path, shapes)]
    gts, preds = predict_records(_Oracle(["cell"], records), records, masks=True, progress=False)
    assert evaluate_detections(gts, preds, ["cell"], iou_type="segm").mAP == 1.0
    # Judged against the full box as truth: a mask IoU just over 0.5.
    gts[0]["masks"] = record_target(
        ImageRecord(
            "Validation", "im.png", 120, 100, path, [Shape("cell", "rectangle", shapes[0].box)]
        ),
        {"cell": 1},
        masks=True,
    )["masks"]
    half = evaluate_detections(gts, preds, ["cell"], iou_type="segm")
    assert half.mAP75 == 0.0 and half.mAP < 0.2  # box IoU would say 1.0


def test_record_target_masks_are_rle_and_evaluate():
    shape = Shape("cell", "polygon", (10.0, 10.0, 50.0, 50.0), polygons=[[10, 10, 50, 10, 30, 50]])
    record = ImageRecord("Train", "a.png", 64, 64, None, [shape])
    target = record_target(record, {"cell": 1}, masks=True)
    assert target["masks"][0]["size"] == [64, 64]
    prediction = dict(target, scores=np.array([0.8]))
    result = evaluate_detections([target], [prediction], ["cell"], iou_type="segm")
    assert result.mAP == 1.0


def test_reports_are_written(tmp_path):
    gts = [gt(BOXES, CLASSES)]
    preds = [pred([*BOXES, [200, 200, 230, 230]], [*CLASSES, 1], [0.9, 0.8, 0.7, 0.2])]
    result = evaluate_detections(gts, preds, LABELS)
    calibration = calibrate_thresholds(gts, preds, LABELS)
    write_reports(tmp_path, result, calibration, prefix="val_")
    text = (tmp_path / "val_results.txt").read_text()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ] = 1.000" in text
    assert format_table(result, calibration) in text
    row = next(line for line in text.splitlines() if line.startswith("cell"))
    assert row.split()[:4] == ["cell", "2", "1.000", "1.000"]
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    assert metrics["mAP"] == 1.0 and metrics["per_class"]["debris"]["gt"] == 1
    assert 0.2 < metrics["calibration"]["threshold"] <= 0.7
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
