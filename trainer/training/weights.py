"""Where a training run starts from: COCO or ImageNet weights, a file, or a previous run.

``--weights coco|imagenet`` use torchvision's weight enums (downloaded once into TORCH_HOME, so a
pre-filled cache works offline). ``--weights runs/OLD`` continues the annotate → train → correct →
retrain loop: every parameter is kept, and class-dependent rows are mapped by label name so labels
added since the old run start fresh while shared labels keep what they learnt.

A retraining (and a weights file) is the same recipe as a first fine-tune, whatever the parent
started from: the network is rebuilt in the structure torchvision gives a pretrained start (frozen
batch norm where its builder freezes it, ``--trainable-backbone-layers`` or the builder's default),
keeping the parent's SSDlite tail, and the parent's weights are loaded into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm

from serverless.architectures import build_model, get_architecture
from serverless.bundle import MODEL_JSON, WEIGHTS, BundleInfo, load_info
from serverless.errors import UserError


@dataclass
class StartingPoint:
    """How to build the model, and what to load into it afterwards."""

    kind: str  # coco | imagenet | none | file | run
    source: str = ""
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None
    parent_labels: list[str] | None = None
    #: The network's structure (Architecture.structure), recorded in the bundle.
    structure: dict[str, Any] = field(default_factory=dict)
    #: What the new run records about its parent run (kind "run").
    parent: dict[str, Any] | None = None
    parent_info: BundleInfo | None = None  # the parent run's description (its sizes and anchors)


def resolve(weights: str, arch: str, trainable_layers: int | None = None) -> StartingPoint:
    """Where ``arch`` starts from; ``trainable_layers`` as ``--trainable-backbone-layers``."""
    spec = get_architecture(arch)
    if weights in ("none", "coco", "imagenet"):
        structure = spec.structure(weights, trainable_layers)
        if weights == "none":
            return StartingPoint("none", structure=structure)
        enum = tvm.get_model_weights(arch if weights == "coco" else spec.backbone).DEFAULT
        build = {"weights" if weights == "coco" else "weights_backbone": enum}
        if trainable_layers is not None:
            build["trainable_backbone_layers"] = trainable_layers
        return StartingPoint(weights, str(enum), build, structure=structure)
    path = Path(weights)
    if (path / MODEL_JSON).exists():
        info = load_info(path)
        if info.architecture != arch:
            raise UserError(
                f"--weights {weights}: that run is a {info.architecture}, not a {arch}; "
                f"pass --arch {info.architecture} to retrain it"
            )
        structure = _fine_tune(spec, trainable_layers, info.structure)
        return StartingPoint(
            "run", str(path.resolve()), {"structure": structure}, state_dict=_load_state(path / WEIGHTS),
            parent_labels=info.labels, structure=structure, parent=_parent_record(path, info),
            parent_info=info,
        )
    if path.is_file():
        structure = _fine_tune(spec, trainable_layers, {})
        return StartingPoint("file", str(path.resolve()), {"structure": structure},
                             state_dict=_load_state(path), structure=structure)
    raise UserError(
        f"--weights {weights!r}: expected coco, imagenet, none, a previous run directory "
        "(with model.json) or a weights file"
    )


def _parent_record(path: Path, info: BundleInfo) -> dict[str, Any]:
    """What a retraining records of its parent: which run, when, from which annotations, and its
    own parent (so the chain of the loop can be read back)."""
    saved = info.provenance
    return {
        "run": str(path.resolve()),
        "created": saved.get("created"),
        "weights": saved.get("weights", {}).get("kind"),
        "sources": saved.get("data", {}).get("sources"),
        "server": saved.get("data", {}).get("server"),
        "parent": saved.get("parent"),
    }


def _fine_tune(spec, trainable_layers: int | None, parent: dict[str, Any]) -> dict[str, Any]:
    """A first fine-tune's structure, with the parent's SSDlite tail (its weights have that shape)."""
    start = "imagenet" if parent.get("reduced_tail") is False else "coco"
    return spec.structure(start, trainable_layers)


def build_from(point: StartingPoint, arch: str, labels: list[str], **model_kwargs: Any):
    """Build ``arch`` for ``labels`` starting from ``point``; downloads happen here."""
    try:
        model = build_model(arch, len(labels), **point.build_kwargs, **model_kwargs)
    except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
        if point.kind not in ("coco", "imagenet"):
            raise
        raise UserError(
            f"could not load {point.kind} weights {point.source} ({exc}). Without network access, "
            "put the file in $TORCH_HOME/hub/checkpoints, pass --weights PATH, or train from "
            "scratch with --weights none"
        ) from exc
    if point.state_dict is not None:
        parent = point.parent_labels or labels
        class_params = get_architecture(arch).class_params
        load_remapped(model, point.state_dict, parent, labels, class_params, source=point.source)
    return model


def load_remapped(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    old_labels: list[str],
    new_labels: list[str],
    class_params: re.Pattern,
    source: str = "weights",
) -> None:
    """Load ``state`` into ``model``; class-dependent tensors are mapped row by row by label name.

    Batch norm's ``num_batches_tracked`` counters are not weights: FrozenBatchNorm2d has none, so a
    parent with trainable batch norm loads into a frozen one and back.
    """
    target = model.state_dict()
    state = {k: v for k, v in state.items() if k in target or not k.endswith(_COUNTER)}
    state |= {k: v for k, v in target.items() if k.endswith(_COUNTER) and k not in state}
    unknown = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state))
    if unknown or missing:
        raise UserError(
            f"{source}: weights do not fit this architecture "
            f"({len(missing)} missing, {len(unknown)} unexpected, e.g. {(missing + unknown)[0]})"
        )
    old_index = {name: i + 1 for i, name in enumerate(old_labels)}
    mapping = [0] + [old_index.get(name) for name in new_labels]  # background stays class 0
    for key, new in target.items():
        old = state[key]
        if class_params.search(key) and old_labels != new_labels:
            target[key] = _remap_rows(key, old, new, mapping, len(old_labels) + 1)
        elif old.shape != new.shape:
            raise UserError(f"{source}: {key} has shape {tuple(old.shape)}, expected {tuple(new.shape)}")
        else:
            target[key] = old
    model.load_state_dict(target)


_COUNTER = ".num_batches_tracked"


def _remap_rows(key: str, old: torch.Tensor, new: torch.Tensor, mapping: list, n_old: int):
    """Copy class rows of ``old`` into a fresh ``new``; layout is (groups, classes, per_class)."""
    per_class = 4 if "bbox_pred" in key else 1
    groups = old.shape[0] // (n_old * per_class)
    if groups * n_old * per_class != old.shape[0]:
        raise UserError(f"cannot map class rows of {key} with shape {tuple(old.shape)}")
    rest = old.shape[1:]
    src = old.reshape(groups, n_old, per_class, *rest)
    dst = new.clone().reshape(groups, len(mapping), per_class, *rest)
    for new_class, old_class in enumerate(mapping):
        if old_class is not None:
            dst[:, new_class] = src[:, old_class]
    return dst.reshape(new.shape)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, never unpickling code; torchvision-reference checkpoints work too."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a loadable weights file (expected a state_dict): {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (parameter name -> tensor)")
    return state
