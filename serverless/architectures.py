"""Detector architectures by name: torchvision models with heads sized for our labels.

Everything the project knows about an architecture lives in its :class:`Architecture` record: its
torchvision model name (builder and weights through ``torchvision.models.get_model`` and
``get_model_weights``), backbone, default input size, whether it serves masks, how its
class-dependent layers are replaced and recognised, its training-only options, and how torchvision's
builder shapes it when it starts from pretrained weights (frozen batch norm, frozen backbone layers,
SSDlite's tail). Adding an architecture is adding one record. The bundle stores the name, the build
options and that *structure* (:meth:`Architecture.structure`), so the function and a retraining
rebuild exactly the network the trainer trained. Pretrained weights are resolved by the trainer; here
models are built with ``weights=None`` unless a torchvision weight enum is passed in.

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

#: Every model reports detections down to this score, whatever torchvision's per-architecture default
#: (FCOS 0.2, RetinaNet 0.05, R-CNN box_score_thresh 0.05, SSDlite 0.001). mAP and threshold
#: calibration then see the same low-score tail on every architecture, and a calibrated (or
#: user-set) threshold below a builtin default still gets its detections in the function.
SCORE_FLOOR = 0.001

#: The ``norm`` of a structure: torchvision's FrozenBatchNorm2d, or trainable nn.BatchNorm2d.
FROZEN_NORM, BATCH_NORM = "frozen", "batch"


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


def _freeze_resnet(model: torch.nn.Module, layers: int) -> None:
    """torchvision's ``_resnet_fpn_extractor``: train the last ``layers`` of layer4..layer1, conv1."""
    body = model.backbone.body
    trained = ("layer4", "layer3", "layer2", "layer1", "conv1")[:layers] + (("bn1",) if layers == 5 else ())
    for name, parameter in body.named_parameters():
        if not name.startswith(trained):
            parameter.requires_grad_(False)


def _mobilenet_frozen_blocks(blocks: list, layers: int) -> int:
    """How many leading MobileNet blocks torchvision's extractors freeze for ``layers`` trainable."""
    stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    return len(blocks) if layers == 0 else stages[len(stages) - layers]


def _freeze_mobilenet_fpn(model: torch.nn.Module, layers: int) -> None:
    """torchvision's ``backbone_utils._mobilenet_extractor`` on the FPN body's blocks."""
    blocks = list(model.backbone.body.children())
    for block in blocks[: _mobilenet_frozen_blocks(blocks, layers)]:
        block.requires_grad_(False)


def _freeze_norm(model: torch.nn.Module) -> None:
    """The backbone body's BatchNorm2d as torchvision's pretrained builders make them:
    FrozenBatchNorm2d with its default eps (the builder passes the class as ``norm_layer``)."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    for module in list(model.backbone.body.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features)
                for buffer in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
                setattr(module, name, frozen)


def _restructure_fpn(model: torch.nn.Module, spec: Architecture, structure: dict[str, Any],
                     num_classes: int) -> None:
    if structure.get("norm") == FROZEN_NORM:
        _freeze_norm(model)
    spec.freeze_backbone(model, structure.get("trainable_backbone_layers", spec.trainable_layers[1]))


def _restructure_ssdlite(model: torch.nn.Module, spec: Architecture, structure: dict[str, Any],
                         num_classes: int) -> None:
    """SSDlite's backbone as its builder makes it: the MobileNet tail is reduced unless the backbone
    starts from ImageNet weights (then the head's input widths change too), and the extractor
    freezes the leading blocks."""
    from functools import partial

    import torch
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection import _utils, ssdlite

    layers = structure.get("trainable_backbone_layers", spec.trainable_layers[1])
    reduced = structure.get("reduced_tail", True)
    if reduced and layers == spec.trainable_layers[1]:
        return  # as get_model built it
    norm = partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.03)  # as torchvision builds it
    backbone = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=reduced)
    model.backbone = ssdlite._mobilenet_extractor(backbone, layers, norm)
    if not reduced:
        widths = _utils.retrieve_out_channels(model.backbone, (320, 320))  # as the builder measures
        anchors = model.anchor_generator.num_anchors_per_location()
        model.head = ssdlite.SSDLiteHead(widths, anchors, num_classes, norm)


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
    #: Attribute path of the builder's score floor (set to :data:`SCORE_FLOOR`).
    score_floor_attr: str = "score_thresh"
    #: torchvision's builder swaps the backbone's BatchNorm2d for FrozenBatchNorm2d when it starts
    #: from pretrained weights (the older builders; the ``_v2`` ones keep BatchNorm2d).
    frozen_norm: bool = False
    #: (default, most) trainable backbone layers of a pretrained start, as torchvision validates them.
    trainable_layers: tuple[int, int] = (3, 5)
    #: torchvision's rule leaving the last N backbone layers trainable (requires_grad) on a built model.
    freeze_backbone: Callable[[torch.nn.Module, int], None] = field(default=_freeze_resnet)
    #: Turns a model built without weights into the given structure (see :meth:`structure`).
    restructure: Callable[..., None] = field(default=_restructure_fpn)
    #: SSDlite: the builder reduces the MobileNet tail unless the backbone starts from ImageNet.
    tail_follows_imagenet: bool = False

    @property
    def shape_type(self) -> str:
        """The CVAT shape the function returns for this architecture."""
        return "mask" if self.masks else "rectangle"

    def structure(self, start: str, trainable_layers: int | None = None) -> dict[str, Any]:
        """The module structure torchvision's builder gives this architecture when it starts from
        ``start`` weights ("coco", "imagenet" or "none"); a bundle records it so that the function
        and a retraining rebuild the same network (:func:`build_model` ``structure``).

        ``norm``: the backbone's normalisation; ``trainable_backbone_layers``: the rest is frozen
        (torchvision ignores a value without pretrained weights: all layers train);
        ``reduced_tail`` (SSDlite only): the MobileNet tail's width.
        """
        pretrained = start != "none"
        default, most = self.trainable_layers
        layers = (default if trainable_layers is None else trainable_layers) if pretrained else most
        shape: dict[str, Any] = {
            "norm": FROZEN_NORM if pretrained and self.frozen_norm else BATCH_NORM,
            "trainable_backbone_layers": layers,
        }
        if self.tail_follows_imagenet:
            shape["reduced_tail"] = start != "imagenet"
        return shape


_RCNN = {
    "replace_heads": _replace_rcnn_heads,
    "class_params": _RCNN_CLASS_PARAMS,
    "detections_kw": "box_detections_per_img",
    "training_options": _rcnn_training_options,
    "score_floor_attr": "roi_heads.score_thresh",  # the builder's box_score_thresh
}
_DENSE = {"replace_heads": _replace_dense_head, "class_params": _DENSE_CLASS_PARAMS}
_MOBILENET_FPN = {"trainable_layers": (3, 6), "freeze_backbone": _freeze_mobilenet_fpn}

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("fasterrcnn_resnet50_fpn_v2", "resnet50", **_RCNN),
        Architecture("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large", frozen_norm=True,
                     priors=_MOBILENET_RCNN_PRIORS, **_RCNN, **_MOBILENET_FPN),
        Architecture("retinanet_resnet50_fpn_v2", "resnet50", priors=_RETINANET_PRIORS, **_DENSE),
        Architecture("fcos_resnet50_fpn", "resnet50", frozen_norm=True, priors=_FCOS_PRIORS, **_DENSE),
        Architecture(
            "ssdlite320_mobilenet_v3_large", "mobilenet_v3_large",
            replace_heads=_replace_ssdlite_head, class_params=_SSDLITE_CLASS_PARAMS,
            min_size=320, max_size=320, fixed_size=True, priors=_SSDLITE_PRIORS,
            trainable_layers=(6, 6), restructure=_restructure_ssdlite, tail_follows_imagenet=True,
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
    structure: dict[str, Any] | None = None,
    **extra: Any,
) -> torch.nn.Module:
    """Build ``arch`` for ``num_labels`` labels (class 0 is background, label i is class i + 1).

    A tuple ``min_size`` trains at a random shorter side per batch (scale jitter) and infers at the
    largest; fixed-size architectures always use one square size.

    ``weights`` (a torchvision COCO weight enum) are loaded with the original 91-class head, which is
    then replaced, so the backbone, neck and box regression start pretrained; torchvision then
    shapes the model itself (``trainable_backbone_layers`` goes to it). Without weights, a
    ``structure`` (:meth:`Architecture.structure`, as a bundle records it) rebuilds the network a
    pretrained start would have given; without one, the model is torchvision's from-scratch build.
    ``anchors`` (see :func:`check_anchors`; None keeps torchvision's) replace the default priors
    after loading: their count per location is the architecture's, so the pretrained
    prior-dependent heads still load. Either way the score floor is :data:`SCORE_FLOOR`.
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
    if structure and weights is None and weights_backbone is None:
        spec.restructure(model, spec, structure, num_classes)
    if spec.fixed_size:
        model.transform.fixed_size = (largest, largest)
    if anchors is not None:
        _set_anchors(model, spec.priors, anchors)
    owner, _, name = spec.score_floor_attr.rpartition(".")
    setattr(model.get_submodule(owner), name, SCORE_FLOOR)
    return model


def infer_structure(arch: str, state: dict[str, Any]) -> dict[str, Any]:
    """The structure of weights saved without one (bundles written before structures were
    recorded): frozen batch norm saves no ``num_batches_tracked`` in the backbone body."""
    spec = get_architecture(arch)
    tracked = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)
    return {"norm": FROZEN_NORM} if spec.frozen_norm and not tracked else {}
