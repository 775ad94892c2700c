"""Small, fast test bundles: untrained networks saved exactly as the trainer saves them.

Random weights still return boxes, so every shape path of the runtime can be exercised without
training; tests that need accurate detections train on generated data instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

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


def write_task_export(
    root: str | Path, frames: Iterable[int], *, labels: dict[int, str] | None = None, size=(64, 48)
) -> Path:
    """A "CVAT for images 1.1" export of a task without a subset (CVAT writes ``<subset>default``
    in the task meta and the images at ``images/<name>``): frame ``i`` is ``img_<i>.png`` with one
    bright box, labelled ``labels.get(i, "cell")``. The same frame number always gives the same
    image, so exports made of overlapping frame ranges are one project growing and shrinking."""
    root = Path(root)
    (root / "images").mkdir(parents=True)
    labels = labels or {}
    items = []
    for i in frames:
        x = 4 + (i * 7) % (size[0] - 28)
        name = f"img_{i:03d}.png"
        pixels = Image.new("RGB", size, (40, 60, 80))
        ImageDraw.Draw(pixels).rectangle([x, 10, x + 19, 29], fill=(230, 200, 40))
        pixels.save(root / "images" / name)
        items.append(
            f'<image id="{i}" name="{name}" width="{size[0]}" height="{size[1]}">'
            f'<box label="{labels.get(i, "cell")}" source="manual" occluded="0" xtl="{x}" ytl="10" '
            f'xbr="{x + 20}" ybr="30" z_order="0"></box></image>'
        )
    names = sorted({"cell", *labels.values()})
    label_xml = "".join(f"<label><name>{n}</name><type>rectangle</type></label>" for n in names)
    (root / "annotations.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task>'
        f"<name>t</name><subset>default</subset><labels>{label_xml}</labels></task></meta>"
        + "".join(items) + "</annotations>\n"
    )
    return root
