"""The bundle as a cvat-sdk auto-annotation function: the way into CVAT where there is no Nuclio.

    cvat-cli task auto-annotate 15 --function-module trainer.cvat.sdk_function -p model=str:runs/bccd

cvat-cli imports this module and calls ``create(**params)``; ``cvat-cli function create-native``
and ``run-agent`` take the same ``--function-module``/``-p`` arguments. Frames go through the shared
decoder conversion and the shared :class:`~serverless.detector.Detector`, so a task gets exactly
what the Nuclio function would return. cvat-sdk is imported here and nowhere else in ``serverless``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models
from cvat_sdk.masks import encode_mask
from PIL import ImageOps

from serverless.detector import Detections, Detector
from serverless.imageio import to_rgb8


class BundleFunction:
    """A cvat-sdk ``DetectionFunction`` for one bundle; spec label ids are the bundle class ids."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.label_ids = {name: i + 1 for i, name in enumerate(detector.labels)}

    @cached_property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        shape_type = "mask" if self.detector.has_masks else "rectangle"
        return cvataa.DetectionFunctionSpec(
            labels=[
                cvataa.label_spec(name, label_id, type=shape_type)
                for name, label_id in self.label_ids.items()
            ]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        """Shapes for one frame; a ``conf_threshold`` of None means the bundle's calibrated ones."""
        detections = self.detector.detect(pil_to_rgb(image), context.conf_threshold)
        return to_shapes(detections, self.label_ids, polygons=context.conv_mask_to_poly)


def create(model: str, device: str = "auto") -> BundleFunction:
    """Factory cvat-cli calls with the ``-p`` parameters: ``model`` is a bundle (run) directory."""
    return BundleFunction(Detector(model, device))


def pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """The decoder's conversion of an opened frame: EXIF orientation, then any mode to RGB uint8."""
    return to_rgb8(ImageOps.exif_transpose(image))


def to_shapes(
    detections: Detections, label_ids: Mapping[str, int], *, polygons: bool = False
) -> list[models.LabeledShapeRequest]:
    """CVAT shape requests (frame 0): boxes, masks, or masks as polygons, with ids from
    ``label_ids``; detections of labels it lacks are left out (callers report them)."""
    shapes = []
    for i in detections.drawable():
        label = detections.labels[i]
        if label not in label_ids:
            continue
        label_id, score = label_ids[label], float(detections.scores[i])
        if not detections.masks:
            points = [float(v) for v in detections.boxes[i]]
            shapes.append(cvataa.rectangle(label_id, points, score=score))
        elif polygons:
            shapes.append(cvataa.polygon(label_id, detections.polygon(i), score=score))
        else:
            bitmap, box = detections.masks[i], detections.mask_boxes[i]
            shapes.append(cvataa.mask(label_id, encode_box_mask(bitmap, box), score=score))
    return shapes


def encode_box_mask(bitmap: np.ndarray, box: tuple[int, int, int, int]) -> list[float]:
    """CVAT mask points for a bitmap of the inclusive image box ``box`` (the detector's layout)."""
    height, width = bitmap.shape
    encoded = encode_mask(bitmap, [0, 0, width, height])
    return [*encoded[:-4], *box]
