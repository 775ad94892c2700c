"""The bundle as a cvat-sdk auto-annotation function: the way into CVAT where there is no Nuclio.

    cvat-cli task auto-annotate 15 --function-module trainer.cvat.sdk_function -p model=str:runs/bccd

cvat-cli imports this module and calls ``create(**params)``; ``cvat-cli function create-native``
and ``run-agent`` take the same ``--function-module``/``-p`` arguments. ``-p score_attribute=str:score``
returns each score as that attribute (``-p score_format=str:percent`` for a number 0-100 step 1
attribute). cvat-sdk's driver is strict about it: the task's attribute must have exactly the
declared type and values, and a task label without it needs ``--allow-unmatched-labels``.
Frames go through the shared decoder conversion and the shared
:class:`~serverless.detector.Detector`, so a task gets exactly what the Nuclio function would
return. cvat-sdk is imported here and nowhere else in ``serverless``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models
from cvat_sdk.attributes import attribute_value_validator
from cvat_sdk.masks import encode_mask
from PIL import ImageOps

from serverless.detector import Detections, Detector
from serverless.imageio import to_rgb8
from serverless.score_attribute import ScoreAttribute, score_text

#: Id of the score attribute within each label of the function's spec.
SCORE_SPEC_ID = 1


@dataclass
class ScoreSlot:
    """Where one label's scores go: the attribute id, the value format ("decimal" or "percent"),
    and cvat-sdk's validator of that attribute; values it refuses are counted, never sent."""

    spec_id: int
    fmt: str
    accepts: Callable[[str], bool]
    rejected: int = 0


class BundleFunction:
    """A cvat-sdk ``DetectionFunction`` for one bundle; spec label ids are the bundle class ids."""

    def __init__(self, detector: Detector, score: ScoreAttribute | None = None) -> None:
        self.detector = detector
        self.label_ids = {name: i + 1 for i, name in enumerate(detector.labels)}
        self.score = score
        self.score_slots: dict[str, ScoreSlot] = {}
        if score is not None:
            accepts = attribute_value_validator(self._score_spec())
            self.score_slots = {name: ScoreSlot(SCORE_SPEC_ID, score.fmt, accepts) for name in self.label_ids}

    def _score_spec(self) -> models.AttributeRequest:
        score = self.score
        return cvataa.attribute_spec(score.name, SCORE_SPEC_ID, score.input_type, score.values)

    @cached_property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        shape_type = "mask" if self.detector.has_masks else "rectangle"
        extra = {"attributes": [self._score_spec()]} if self.score is not None else {}
        return cvataa.DetectionFunctionSpec(
            labels=[
                cvataa.label_spec(name, label_id, type=shape_type, **extra)
                for name, label_id in self.label_ids.items()
            ]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        """Shapes for one frame; a ``conf_threshold`` of None means the bundle's calibrated ones."""
        detections = self.detector.detect(pil_to_rgb(image), context.conf_threshold)
        return to_shapes(
            detections, self.label_ids, polygons=context.conv_mask_to_poly, scores=self.score_slots
        )


def create(
    model: str, device: str = "auto", score_attribute: str = "", score_format: str = "decimal"
) -> BundleFunction:
    """Factory cvat-cli calls with the ``-p`` parameters: ``model`` is a bundle (run) directory;
    ``score_attribute`` names the attribute the scores go to (empty: none), ``score_format`` is
    "decimal" (a text attribute) or "percent" (a number attribute 0-100 step 1)."""
    score = ScoreAttribute(score_attribute, score_format) if score_attribute else None
    return BundleFunction(Detector(model, device), score)


def pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """The decoder's conversion of an opened frame: EXIF orientation, then any mode to RGB uint8."""
    return to_rgb8(ImageOps.exif_transpose(image))


def to_shapes(
    detections: Detections,
    label_ids: Mapping[str, int],
    *,
    polygons: bool = False,
    scores: Mapping[str, ScoreSlot] | None = None,
) -> list[models.LabeledShapeRequest]:
    """CVAT shape requests (frame 0): boxes, masks, or masks as polygons, with ids from
    ``label_ids``; detections of labels it lacks are left out (callers report them). A label with
    a slot in ``scores`` gets its score as that attribute when the slot accepts the value."""
    shapes = []
    for i in detections.drawable():
        label = detections.labels[i]
        if label not in label_ids:
            continue
        label_id, score = label_ids[label], float(detections.scores[i])
        extra = {"score": score, "attributes": score_values(score, (scores or {}).get(label))}
        if not detections.masks:
            points = [float(v) for v in detections.boxes[i]]
            shapes.append(cvataa.rectangle(label_id, points, **extra))
        elif polygons:
            shapes.append(cvataa.polygon(label_id, detections.polygon(i), **extra))
        else:
            bitmap, box = detections.masks[i], detections.mask_boxes[i]
            shapes.append(cvataa.mask(label_id, encode_box_mask(bitmap, box), **extra))
    return shapes


def score_values(score: float, slot: ScoreSlot | None) -> list[models.AttributeValRequest]:
    """The score as the slot's attribute value, or nothing (no slot, or a value it refuses)."""
    if slot is None:
        return []
    text = score_text(score, slot.fmt)
    if not slot.accepts(text):
        slot.rejected += 1
        return []
    return [models.AttributeValRequest(spec_id=slot.spec_id, value=text)]


def encode_box_mask(bitmap: np.ndarray, box: tuple[int, int, int, int]) -> list[float]:
    """CVAT mask points for a bitmap of the inclusive image box ``box`` (the detector's layout)."""
    height, width = bitmap.shape
    encoded = encode_mask(bitmap, [0, 0, width, height])
    return [*encoded[:-4], *box]
