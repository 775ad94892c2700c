"""Small, fast test bundles: untrained networks saved exactly as the trainer saves them.

Random weights still return boxes, so every shape path of the runtime can be exercised without
training; tests that need accurate detections train on generated data instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from serverless.architectures import get_architecture
from serverless.bundle import BundleInfo, save_bundle


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
    feature_gain: float = 1.0,
) -> Path:
    """Write an untrained bundle to ``directory``; Mask R-CNN bundles serve masks.

    ``feature_gain`` multiplies the FPN's lateral convolutions: an untrained MobileNet's features
    vanish (~1e-8), so every detection gets the same score and ties decide which ones a cap keeps;
    a gain of 1e8 gives features of order 1 and scores that differ, as a trained model's do."""
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
    if feature_gain != 1.0:
        with torch.no_grad():
            for block in model.backbone.fpn.inner_blocks:
                block[0].weight *= feature_gain
    save_bundle(directory, info, model.state_dict())
    return Path(directory)
