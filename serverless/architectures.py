"""Detector architectures by name: torchvision models with heads sized for our labels.

Everything the project knows about an architecture lives in its :class:`Architecture` record: its
torchvision model name (builder and weights through ``torchvision.models.get_model`` and
``get_model_weights``), backbone, default input size, whether it serves masks, how its
class-dependent layers are replaced and recognised, and its training-only options. Adding an
architecture is adding one record. The bundle stores only the name and the build options, so the
function rebuilds exactly the network the trainer trained. Pretrained weights are resolved by the
trainer; here models are built with ``weights=None`` unless a torchvision weight enum is passed in.

Each record also states where its priors are (anchors; SSD default boxes): the feature strides, the
layout of torchvision's default sizes and aspect ratios. ``build_model(..., anchors=...)`` replaces
those defaults with sizes fitted to a dataset (``trainer.training.anchors``) while keeping the number
of anchors per location, so every pretrained head weight still fits; the bundle stores the sizes.

The records import nothing heavy, so command-line parsers can list them without loading torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serverless.errors import UnknownArchitectureError

if TYPE_CHECKING:
    import torch


def _replace_rcnn_heads(model: torch.nn.Module, num_classes: int) -> None:
    predictor = model.roi_heads.box_predictor
    model.roi_heads.box_predictor = type(predictor)(predictor.cls_score.in_features, num_classes)
    old = getattr(model.roi_heads, "mask_predictor", None)
    if old is not None:
        model.roi_heads.mask_predictor = type(old)(
            old.conv5_mask.in_channels, old.conv5_mask.out_channels, num_classes
        )


def _replace_dense_head(model: torch.nn.Module, num_classes: int) -> None:
    """RetinaNet and FCOS: one conv predicts every anchor's (location's) class logits."""
    head = model.head.classification_head
    head.num_classes = num_classes
    head.cls_logits = _like_conv(head.cls_logits, head.num_anchors * num_classes)


def _replace_ssdlite_head(model: torch.nn.Module, num_classes: int) -> None:
    from functools import partial

    import torch
    from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

    old = model.head.classification_head.module_list
    in_channels = [block[0][0].in_channels for block in old]
    anchors = model.anchor_generator.num_anchors_per_location()
    norm = partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.03)  # as torchvision builds it
    model.head.classification_head = SSDLiteClassificationHead(in_channels, anchors, num_classes, norm)


def _like_conv(old: torch.nn.Conv2d, out_channels: int) -> torch.nn.Conv2d:
    """A conv shaped like ``old`` with a new output width, initialised as torchvision does."""
    import torch

    new = torch.nn.Conv2d(old.in_channels, out_channels, old.kernel_size, old.stride, old.padding)
    torch.nn.init.normal_(new.weight, std=0.01)
    torch.nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
    return new


#: Class-dependent parameters of each head family: their first dimension is laid out by class.
_RCNN_CLASS_PARAMS = re.compile(
    r"(box_predictor\.(cls_score|bbox_pred)|mask_predictor\.mask_fcn_logits)\.(weight|bias)$"
)
_DENSE_CLASS_PARAMS = re.compile(r"classification_head\.cls_logits\.(weight|bias)$")
_SSDLITE_CLASS_PARAMS = re.compile(r"classification_head\.module_list\.\d+\.1\.(weight|bias)$")


@dataclass(frozen=True)
class Priors:
    """Where an architecture's priors sit and what torchvision makes them by default.

    ``layout``: "levels" gives level i the sizes ``sizes[i]`` (FPN R-CNN, RetinaNet); "shared" puts
    every size on every level (the MobileNet R-CNN); "ssd" is SSD's default boxes, ``sizes[i]`` being
    a fraction of the square input with one extra scale at the end; "none" has no configurable
    priors (FCOS: one location per feature cell, sized ranges per level fixed by its stride).
    """

    layout: str
    strides: tuple[int, ...]  # feature stride of each level in resized-image pixels, finest first
    owner: str = ""  # attribute path of the model's anchor generator
    sizes: tuple[tuple[float, ...], ...] = ()  # torchvision's defaults, px (ssd: fractions)
    aspect_ratios: tuple[tuple[float, ...], ...] = ()  # height / width (ssd: extra w:h pairs)

    def default_anchors(self) -> dict[str, list] | None:
        """torchvision's own priors in the form a bundle stores fitted ones."""
        if self.layout == "none":
            return None
        key = "scales" if self.layout == "ssd" else "sizes"
        sizes = list(self.sizes[0]) if self.layout == "ssd" else [list(s) for s in self.sizes]
        return {key: sizes, "aspect_ratios": [list(r) for r in self.aspect_ratios]}


_FPN_RCNN_PRIORS = Priors(
    "levels", (4, 8, 16, 32, 64), "rpn.anchor_generator",
    tuple((s,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5,
)
_RETINANET_PRIORS = Priors(
    "levels", (8, 16, 32, 64, 128), "anchor_generator",
    tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512)),
    ((0.5, 1.0, 2.0),) * 5,
)
_MOBILENET_RCNN_PRIORS = Priors(
    "shared", (32, 32, 64), "rpn.anchor_generator", ((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3
)
_SSDLITE_PRIORS = Priors(
    "ssd", (16, 32, 64, 107, 160, 320), "anchor_generator",
    ((0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0),), ((2.0, 3.0),) * 6,
)  # strides at the 320 px input; the first (the backbone's stride 16) holds at every input size
_FCOS_PRIORS = Priors("none", (8, 16, 32, 64, 128))


def check_anchors(priors: Priors, anchors: dict[str, Any]) -> None:
    """Raise ValueError unless ``anchors`` fit ``priors``: same levels, same anchors per location."""
    if priors.layout == "none":
        raise ValueError("this architecture has no configurable anchors")
    default = priors.default_anchors()
    if not isinstance(anchors, dict) or set(anchors) != set(default):
        raise ValueError(f"expected a mapping with the keys {sorted(default)}, got {anchors!r}")
    for key, expected in default.items():
        got = anchors[key]
        if not isinstance(got, list) or len(got) != len(expected):
            raise ValueError(f"{key}: expected {len(expected)} entries, got {got!r}")
        rows = [(g, e) for g, e in zip(got, expected, strict=True) if isinstance(e, list)]
        if any(not isinstance(g, list) or len(g) != len(e) for g, e in rows):
            raise ValueError(f"{key}: expected {[len(e) for e in expected]} values per level, got {got!r}")
        values = [v for g in got for v in (g if isinstance(g, list) else [g])]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e5 for v in values):
            raise ValueError(f"{key}: expected positive numbers, got {got!r}")


def _anchor_generator(priors: Priors, anchors: dict[str, Any]) -> torch.nn.Module:
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

    ratios = [list(map(float, r)) for r in anchors["aspect_ratios"]]
    if priors.layout == "ssd":
        return DefaultBoxGenerator(ratios, scales=[float(s) for s in anchors["scales"]])
    return AnchorGenerator(tuple(tuple(map(float, s)) for s in anchors["sizes"]), tuple(map(tuple, ratios)))


def _set_anchors(model: torch.nn.Module, priors: Priors, anchors: dict[str, Any]) -> None:
    """Swap the model's default priors for ``anchors``; the heads keep their shapes."""
    check_anchors(priors, anchors)
    *path, name = priors.owner.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part)
    new = _anchor_generator(priors, anchors)
    if new.num_anchors_per_location() != getattr(owner, name).num_anchors_per_location():
        raise ValueError("anchors per location differ from the architecture's")
    setattr(owner, name, new)


def _rcnn_training_options(roi_batch_size: int) -> dict[str, Any]:
    return {"box_batch_size_per_image": roi_batch_size}


def _no_training_options(roi_batch_size: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Architecture:
    """One detector family member and everything the project does differently for it."""

    name: str  # torchvision's model name: get_model(name), get_model_weights(name) (COCO)
    backbone: str  # torchvision's name of the backbone: its ImageNet weights
    replace_heads: Callable[[torch.nn.Module, int], None]  # fresh class layers for N classes
    class_params: re.Pattern  # state_dict keys whose rows are per class (retraining remaps them)
    min_size: int = 800  # default shorter side the model resizes to
    max_size: int = 1333
    fixed_size: bool = False  # resizes every image to one square min_size x min_size (SSDlite)
    masks: bool = False  # predicts instance masks; trains on polygons and masks
    priors: Priors = _FPN_RCNN_PRIORS  # where the anchors sit and torchvision's default sizes
    detections_kw: str = "detections_per_img"  # constructor keyword capping detections per image
    #: Constructor options that only matter in training, from the --roi-batch-size setting.
    training_options: Callable[[int], dict[str, Any]] = field(default=_no_training_options)

    @property
    def shape_type(self) -> str:
        """The CVAT shape the function returns for this architecture."""
        return "mask" if self.masks else "rectangle"


_RCNN = {
    "replace_heads": _replace_rcnn_heads,
    "class_params": _RCNN_CLASS_PARAMS,
    "detections_kw": "box_detections_per_img",
    "training_options": _rcnn_training_options,
}
_DENSE = {"replace_heads": _replace_dense_head, "class_params": _DENSE_CLASS_PARAMS}

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("fasterrcnn_resnet50_fpn_v2", "resnet50", **_RCNN),
        Architecture("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large", priors=_MOBILENET_RCNN_PRIORS,
                     **_RCNN),
        Architecture("retinanet_resnet50_fpn_v2", "resnet50", priors=_RETINANET_PRIORS, **_DENSE),
        Architecture("fcos_resnet50_fpn", "resnet50", priors=_FCOS_PRIORS, **_DENSE),
        Architecture(
            "ssdlite320_mobilenet_v3_large", "mobilenet_v3_large",
            replace_heads=_replace_ssdlite_head, class_params=_SSDLITE_CLASS_PARAMS,
            min_size=320, max_size=320, fixed_size=True, priors=_SSDLITE_PRIORS,
        ),
        Architecture("maskrcnn_resnet50_fpn_v2", "resnet50", masks=True, **_RCNN),
    ]
}  # fmt: skip

DEFAULT_ARCH = "fasterrcnn_resnet50_fpn_v2"


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; expected one of: {known}"
        ) from None


def build_model(
    arch: str,
    num_labels: int,
    *,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int | None = None,
    detections_per_img: int = 300,
    weights: Any = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    anchors: dict[str, Any] | None = None,
    **extra: Any,
) -> torch.nn.Module:
    """Build ``arch`` for ``num_labels`` labels (class 0 is background, label i is class i + 1).

    A tuple ``min_size`` trains at a random shorter side per batch (scale jitter) and infers at the
    largest; fixed-size architectures always use one square size.

    ``weights`` (a torchvision COCO weight enum) are loaded with the original 91-class head, which is
    then replaced, so the backbone, neck and box regression start pretrained. ``anchors`` (see
    :func:`check_anchors`; None keeps torchvision's) replace the default priors after loading: their
    count per location is the architecture's, so the pretrained prior-dependent heads still load.
    """
    spec = get_architecture(arch)
    num_classes = num_labels + 1
    largest = max(min_size) if isinstance(min_size, tuple) else (min_size or spec.min_size)
    kwargs: dict[str, Any] = {spec.detections_kw: detections_per_img, "weights_backbone": weights_backbone}
    if not spec.fixed_size:
        kwargs.update(min_size=min_size or spec.min_size, max_size=max_size or max(spec.max_size, largest))
    if trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = trainable_backbone_layers
    kwargs.update(extra)  # training-only knobs of the torchvision constructor
    from torchvision.models import get_model

    if weights is None:
        model = get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    else:
        model = get_model(arch, weights=weights, **kwargs)
        spec.replace_heads(model, num_classes)
    if spec.fixed_size:
        model.transform.fixed_size = (largest, largest)
    if anchors is not None:
        _set_anchors(model, spec.priors, anchors)
    return model
