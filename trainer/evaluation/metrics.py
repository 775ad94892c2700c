"""COCO metrics (mAP@[.5:.95], AP50, AP75, per-class AP) of in-memory detections (faster-coco-eval).

Ground truth and predictions are per-image dicts of numpy arrays in source-image pixels, the format
the training loop and ``predict_records`` produce, so the same numbers come out of every epoch's
validation, ``python -m trainer evaluate`` and the bundle's results.txt.

- gt: ``{"boxes": (N, 4) xyxy, "labels": (N,) class ids (1-based), "masks"?: (N, H, W) bool}``
- pred: the same plus ``"scores": (N,)``.

``"masks"`` may also be a list of COCO RLE dicts (``faster_coco_eval.core.mask.encode``): that
keeps memory small when hundreds of detections per image are held for a whole subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils
from tqdm import tqdm

from serverless.errors import UserError
from serverless.imageio import read_image
from trainer.inference import detect_each

if TYPE_CHECKING:
    from serverless.detector import Detector
    from trainer.data.records import ImageRecord

IOU_TYPES = ("bbox", "segm")


@dataclass
class EvalResult:
    """COCO metrics of one evaluation; AP values are in [0, 1]."""

    mAP: float  # AP averaged over IoU .50:.05:.95 and over the classes that have ground truth
    mAP50: float
    mAP75: float
    #: label -> {"AP", "AP50", "AP75", "gt"}; APs are None for a class without ground truth.
    per_class: dict[str, dict[str, Any]]
    iou_type: str = "bbox"
    max_dets: int = 300
    images: int = 0
    detections: int = 0
    #: The COCO summary lines (AP/AR by area range and detection budget), as COCOeval prints them.
    summary: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_detections(
    gts: list[dict],
    preds: list[dict],
    labels: list[str],
    *,
    max_dets: int = 300,
    iou_type: str = "bbox",
) -> EvalResult:
    """COCO-evaluate ``preds`` against ``gts`` (same order: one dict per image)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images but {len(preds)} prediction images")
    if max_dets < 1:
        raise ValueError(f"max_dets must be at least 1, got {max_dets}")
    images, gt_anns, dt_anns = _coco_annotations(gts, preds, len(labels), iou_type)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(labels)]
    coco_gt = COCO({"images": images, "annotations": gt_anns, "categories": categories})
    coco_dt = COCO({"images": images, "annotations": dt_anns, "categories": categories})
    lines: list[str] = []
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lines.append)
    # The default budget (1, 10, 100) would drop detections on dense images (hundreds of cells).
    evaluator.params.maxDets = sorted({m for m in (1, 10) if m < max_dets} | {max_dets})
    evaluator.params.catIds = [c["id"] for c in categories]
    evaluator.evaluate()
    evaluator.accumulate()
    lines.clear()
    evaluator.summarize()
    precision = evaluator.eval["precision"]  # [IoU T, recall R, class K, area A, maxDets M]
    iou_thrs = evaluator.params.iouThrs
    per_class = {
        name: {
            "AP": _mean_ap(precision[:, :, k, 0, -1]),
            "AP50": _mean_ap(precision[_iou_index(iou_thrs, 0.5), :, k, 0, -1]),
            "AP75": _mean_ap(precision[_iou_index(iou_thrs, 0.75), :, k, 0, -1]),
            "gt": sum(int(np.sum(np.asarray(g["labels"]) == k + 1)) for g in gts),
        }
        for k, name in enumerate(labels)
    }
    return EvalResult(
        mAP=_mean_ap(precision[:, :, :, 0, -1]) or 0.0,
        mAP50=_mean_ap(precision[_iou_index(iou_thrs, 0.5), :, :, 0, -1]) or 0.0,
        mAP75=_mean_ap(precision[_iou_index(iou_thrs, 0.75), :, :, 0, -1]) or 0.0,
        per_class=per_class,
        iou_type=iou_type,
        max_dets=max_dets,
        images=len(gts),
        detections=len(dt_anns),
        summary=[line.strip() for line in lines if "Average" in line],
    )


def _coco_annotations(
    gts: list[dict], preds: list[dict], num_classes: int, iou_type: str
) -> tuple[list[dict], list[dict], list[dict]]:
    """COCO images, ground-truth and detection annotations (ids start at 1: 0 means unmatched)."""
    images: list[dict] = []
    gt_anns: list[dict] = []
    dt_anns: list[dict] = []
    for image_id, (gt, pred) in enumerate(zip(gts, preds, strict=True), start=1):
        height, width = _image_size(gt, pred)
        images.append({"id": image_id, "height": height, "width": width})
        for anns, target, is_pred in ((gt_anns, gt, False), (dt_anns, pred, True)):
            for ann in _annotations(
                target, image_id, (height, width), num_classes, iou_type, is_pred
            ):
                ann["id"] = len(anns) + 1
                anns.append(ann)
    return images, gt_anns, dt_anns


def _annotations(
    target: dict,
    image_id: int,
    hw: tuple[int, int],
    num_classes: int,
    iou_type: str,
    is_pred: bool,
) -> list[dict]:
    kind = "prediction" if is_pred else "ground truth"
    boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(target["labels"], dtype=np.int64).reshape(-1)
    if len(classes) != len(boxes):
        raise ValueError(f"image {image_id} {kind}: {len(boxes)} boxes but {len(classes)} labels")
    if len(classes) and (classes.min() < 1 or classes.max() > num_classes):
        raise ValueError(
            f"image {image_id} {kind}: class ids must be in 1..{num_classes}, "
            f"got {classes.min()}..{classes.max()}"
        )
    wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 0.0)
    xywh = np.concatenate([boxes[:, :2], wh], axis=1).tolist()
    anns = [
        {"image_id": image_id, "category_id": c, "bbox": b, "area": a, "iscrowd": 0}
        for c, b, a in zip(classes.tolist(), xywh, (wh[:, 0] * wh[:, 1]).tolist(), strict=True)
    ]
    if iou_type == "segm":
        rles = _rles(target, hw, len(boxes), f"image {image_id} {kind}")
        for ann, rle in zip(anns, rles, strict=True):
            ann["segmentation"], ann["area"] = rle, _rle_area(rle)
    if is_pred:
        scores = np.asarray(target["scores"], dtype=np.float64).reshape(-1).tolist()
        if len(scores) != len(anns):
            raise ValueError(f"image {image_id} {kind}: {len(anns)} boxes but {len(scores)} scores")
        for ann, score in zip(anns, scores, strict=True):
            ann["score"] = score
    return anns


def _rles(target: dict, hw: tuple[int, int], count: int, what: str) -> list[dict]:
    masks = target.get("masks")
    if masks is None:
        raise ValueError(f"{what}: iou_type 'segm' needs 'masks'")
    if isinstance(masks, np.ndarray):
        masks = np.asarray(masks, dtype=bool).reshape(-1, *hw)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        rles = list(rles) if count else []
    else:
        rles = list(masks)
    if len(rles) != count:
        raise ValueError(f"{what}: {count} boxes but {len(rles)} masks")
    return rles


def _rle_area(rle: dict) -> float:
    return float(np.asarray(mask_utils.area([rle])).reshape(-1)[0])


def _image_size(gt: dict, pred: dict) -> tuple[int, int]:
    """(height, width): from the masks when there are any (segm needs them), else nominal."""
    for target in (gt, pred):
        masks = target.get("masks")
        if isinstance(masks, np.ndarray) and masks.ndim == 3:
            return int(masks.shape[1]), int(masks.shape[2])
        if masks is not None and len(masks):
            height, width = masks[0]["size"]
            return int(height), int(width)
    return 1, 1  # boxes need no canvas; COCO only wants a size


def _iou_index(iou_thrs: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(iou_thrs - value)))


def _mean_ap(precision: np.ndarray) -> float | None:
    """Mean of the valid entries (COCO marks classes without ground truth with -1)."""
    valid = precision[precision > -1]
    if valid.size == 0:
        return None
    value = float(np.mean(valid))
    return value if math.isfinite(value) else None


def predict_records(
    detector: Detector,
    records: Sequence[ImageRecord],
    *,
    masks: bool = False,
    progress: bool = True,
    max_pixels: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run ``detector`` (threshold 0: every detection counts for AP) over ``records``.

    Returns ground truth and predictions in the bundle's class ids, labels matched by name; shapes
    whose label the model does not know are left out. With ``masks``, both carry COCO RLE masks
    for ``iou_type="segm"``. Images over ``max_pixels`` (default: the configured limit) are refused.
    """
    class_ids = {name: i + 1 for i, name in enumerate(detector.labels)}
    missing = [r for r in records if r.path is None]
    if missing:
        raise UserError(
            f"{missing[0].identity}: image file not in the export ({len(missing)} such images); "
            "evaluation needs exports with images"
        )
    gts, preds = [], []
    detected = detect_each(detector, records, lambda record: read_image(record.path, max_pixels),
                           threshold=0.0)
    for record, image, det in tqdm(
        detected, total=len(records), desc="evaluate", unit="img", disable=not progress
    ):
        if det is None:
            raise image  # the decode error: an evaluation image must be readable
        gts.append(record_target(record, class_ids, masks=masks))
        pred = {
            "boxes": det.boxes.astype(np.float64).reshape(-1, 4),
            "scores": det.scores.astype(np.float64),
            "labels": np.array([class_ids[name] for name in det.labels], dtype=np.int64),
        }
        if masks:
            pred["masks"] = [_encode(det.full_mask(i, image.shape[:2])) for i in range(len(det))]
        preds.append(pred)
    return gts, preds


def record_target(record: ImageRecord, class_ids: dict[str, int], *, masks: bool = False) -> dict:
    """The ground-truth dict of one record; shapes with labels outside ``class_ids`` are dropped."""
    shapes = [s for s in record.shapes if s.label in class_ids]
    target = {
        "boxes": np.array([s.box for s in shapes], dtype=np.float64).reshape(-1, 4),
        "labels": np.array([class_ids[s.label] for s in shapes], dtype=np.int64),
    }
    if masks:
        target["masks"] = [_encode(s.to_mask(record.width, record.height)) for s in shapes]
    return target


def _encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
