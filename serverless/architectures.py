"""Detector architectures by name: torchvision models with heads sized for our labels.

The bundle stores only the name and the build options, so the function rebuilds exactly the network the
trainer trained. Pretrained weights are resolved by the trainer; here models are built with
``weights=None`` unless a torchvision weight enum is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torchvision.models import detection as tvd
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

from serverless.errors import UnknownArchitectureError


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., torch.nn.Module]
    coco_weights: str  # attribute of the torchvision weights enum, e.g. "FasterRCNN_..._Weights"
    backbone_weights: str  # ImageNet weights enum for the backbone
    min_size: int  # default shorter side the model resizes to
    max_size: int
    masks: bool = False
    #: Keyword that caps detections per image in this architecture's constructor.
    detections_kw: str = "box_detections_per_img"


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(
            "fasterrcnn_resnet50_fpn_v2", tvd.fasterrcnn_resnet50_fpn_v2,
            "FasterRCNN_ResNet50_FPN_V2_Weights", "ResNet50_Weights", 800, 1333,
        ),
        Architecture(
            "fasterrcnn_mobilenet_v3_large_fpn", tvd.fasterrcnn_mobilenet_v3_large_fpn,
            "FasterRCNN_MobileNet_V3_Large_FPN_Weights", "MobileNet_V3_Large_Weights", 800, 1333,
        ),
        Architecture(
            "retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2,
            "RetinaNet_ResNet50_FPN_V2_Weights", "ResNet50_Weights", 800, 1333,
            detections_kw="detections_per_img",
        ),
        Architecture(
            "fcos_resnet50_fpn", tvd.fcos_resnet50_fpn,
            "FCOS_ResNet50_FPN_Weights", "ResNet50_Weights", 800, 1333,
            detections_kw="detections_per_img",
        ),
        Architecture(
            "ssdlite320_mobilenet_v3_large", tvd.ssdlite320_mobilenet_v3_large,
            "SSDLite320_MobileNet_V3_Large_Weights", "MobileNet_V3_Large_Weights", 320, 320,
            detections_kw="detections_per_img",
        ),
        Architecture(
            "maskrcnn_resnet50_fpn_v2", tvd.maskrcnn_resnet50_fpn_v2,
            "MaskRCNN_ResNet50_FPN_V2_Weights", "ResNet50_Weights", 800, 1333, masks=True,
        ),
    ]
}

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
    **extra: Any,
) -> torch.nn.Module:
    """Build ``arch`` for ``num_labels`` labels (class 0 is background, label i is class i + 1).

    A tuple ``min_size`` trains at a random shorter side per batch (scale jitter) and infers at the
    largest; SSDlite always uses one square size.

    ``weights`` (a torchvision COCO weight enum) are loaded with the original 91-class head, which is
    then replaced, so the backbone, neck and box regression start pretrained.
    """
    spec = get_architecture(arch)
    num_classes = num_labels + 1
    largest = max(min_size) if isinstance(min_size, tuple) else (min_size or spec.min_size)
    kwargs: dict[str, Any] = {
        "min_size": min_size or spec.min_size,
        "max_size": max_size or max(spec.max_size, largest),
        spec.detections_kw: detections_per_img,
        "weights_backbone": weights_backbone,
    }
    if trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = trainable_backbone_layers
    kwargs.update(extra)  # training-only knobs of the torchvision constructor
    fixed_size = None
    if arch.startswith("ssdlite"):  # SSDlite resizes every image to one square size
        fixed_size = largest
        del kwargs["min_size"], kwargs["max_size"]
    if weights is None:
        model = spec.builder(weights=None, num_classes=num_classes, **kwargs)
    else:
        model = spec.builder(weights=weights, **kwargs)
        replace_heads(model, arch, num_classes)
    if fixed_size:
        model.transform.fixed_size = (fixed_size, fixed_size)
    return model


def replace_heads(model: torch.nn.Module, arch: str, num_classes: int) -> None:
    """Swap the class-dependent layers of a pretrained model for freshly initialised ones."""
    if arch.startswith(("fasterrcnn", "maskrcnn")):
        predictor = model.roi_heads.box_predictor
        model.roi_heads.box_predictor = type(predictor)(predictor.cls_score.in_features, num_classes)
        if arch.startswith("maskrcnn"):
            old = model.roi_heads.mask_predictor
            model.roi_heads.mask_predictor = type(old)(
                old.conv5_mask.in_channels, old.conv5_mask.out_channels, num_classes
            )
    elif arch.startswith(("retinanet", "fcos")):
        head = model.head.classification_head
        head.num_classes = num_classes
        head.cls_logits = _like_conv(head.cls_logits, head.num_anchors * num_classes)
    elif arch.startswith("ssdlite"):
        old = model.head.classification_head.module_list
        in_channels = [block[0][0].in_channels for block in old]
        anchors = model.anchor_generator.num_anchors_per_location()
        norm = partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.03)  # as torchvision builds it
        model.head.classification_head = SSDLiteClassificationHead(
            in_channels, anchors, num_classes, norm
        )
    else:  # every registered architecture is handled above
        raise UnknownArchitectureError(arch)


def _like_conv(old: torch.nn.Conv2d, out_channels: int) -> torch.nn.Conv2d:
    """A conv shaped like ``old`` with a new output width, initialised as torchvision does."""
    new = torch.nn.Conv2d(old.in_channels, out_channels, old.kernel_size, old.stride, old.padding)
    torch.nn.init.normal_(new.weight, std=0.01)
    torch.nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
    return new
