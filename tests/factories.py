"""Small, fast test bundles: untrained networks saved exactly as the trainer saves them.

Random weights still return boxes, so every shape path of the runtime can be exercised without
training; tests that need accurate detections train on generated data instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from serverless.architectures import get_architecture
from serverless.bundle import BundleInfo, save_bundle

#: The small Mask R-CNN bundle the mask tests share (conftest ``shared_bundle``).
MASK_BUNDLE = {"arch": "maskrcnn_resnet50_fpn_v2", "threshold": 0.5, "min_size": 64, "max_size": 96,
               "detections_per_img": 5}


def make_bundle(
    directory: str | Path,
    labels: list[str] | None = None,
    *,
    arch: str = "fasterrcnn_mobilenet_v3_large_fpn",
    threshold: float = 0.0,
    min_size: int = 160,
    max_size: int = 256,
    detections_per_img: int = 20,
    seed: int = 0,
) -> Path:
    """Write an untrained bundle to ``directory``; Mask R-CNN bundles serve masks."""
    torch.manual_seed(seed)
    info = BundleInfo(
        architecture=arch,
        labels=labels or ["cell", "debris"],
        shape_type=get_architecture(arch).shape_type,
        min_size=min_size,
        max_size=max_size,
        detections_per_img=detections_per_img,
        threshold=threshold,
    )
    model = info.build()
    save_bundle(directory, info, model.state_dict())
    return Path(directory)
