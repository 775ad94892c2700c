"""Folder inference: run a bundle on every image under a directory, write COCO-style results.

The results file is what reviewers and scripts read (``faster-coco-eval`` loads it as detections);
previews are for eyes. Images are decoded by the same decoder as training and the function, one
thread ahead of the model so the device does not wait on disk and JPEG decoding.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from serverless.bundle import atomic_write
from serverless.imageio import ImageDecodeError, read_image

if TYPE_CHECKING:  # the model is handed in: crops of annotations use this module without torch
    from serverless.detector import Detections, Detector

#: File types the shared decoder reads (matched case-insensitively).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})

#: Outline colours of the preview boxes, by label index.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]  # fmt: skip

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class FolderPredictions:
    """What one run over a folder produced."""

    coco: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)  # detections per label
    failures: list[str] = field(default_factory=list)  # why each unreadable file was skipped


def find_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` in sorted order; hidden entries and ``exclude`` are skipped."""
    exclude = exclude.resolve() if exclude else None
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if exclude and (path.resolve() == exclude or exclude in path.resolve().parents):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return found


def ordered(
    fn: Callable[[T], R], items: Iterable[T], depth: int = 2, pool: Executor | None = None
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, computed up to ``depth`` items ahead on ``pool`` (a
    private background thread when None), so the caller's work overlaps the next items' loading."""
    with ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > depth:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def detect_each(
    detector: Detector,
    items: Iterable[T],
    read: Callable[[T], np.ndarray],
    threshold: float | None = None,
    *,
    depth: int = 2,
    pool: Executor | None = None,
) -> Iterator[tuple[T, np.ndarray | ImageDecodeError, Detections | None]]:
    """The one batch-inference path (folders, evaluation, crops, CVAT tasks): each item's image
    is read ahead by ``read`` (see :func:`ordered`) and detected here, in the caller's thread.
    An unreadable image comes back as its ImageDecodeError, with no detections."""

    def load(item: T) -> np.ndarray | ImageDecodeError:
        try:
            return read(item)
        except ImageDecodeError as exc:
            return exc

    for item, image in ordered(load, items, depth, pool):
        if isinstance(image, ImageDecodeError):
            yield item, image, None
        else:
            yield item, image, detector.detect(image, threshold)


def predict_folder(
    detector: Detector,
    root: Path,
    *,
    threshold: float | None = None,
    previews: Path | None = None,
    progress: bool = True,
) -> FolderPredictions:
    """Detect on every image under ``root``; unreadable files are reported, not fatal."""
    paths = find_images(root, exclude=previews)
    result = FolderPredictions(coco=coco_skeleton(detector, threshold))
    category_ids = {name: i + 1 for i, name in enumerate(detector.labels)}
    detected = detect_each(detector, paths, read_image, threshold)
    for path, image, det in tqdm(detected, total=len(paths), unit="img", disable=not progress):
        rel = path.relative_to(root).as_posix()
        if det is None:
            result.failures.append(str(image))
            continue
        image_id = len(result.coco["images"]) + 1
        height, width = image.shape[:2]
        result.coco["images"].append(
            {"id": image_id, "file_name": rel, "width": width, "height": height}
        )
        for i in det.drawable():
            label = det.labels[i]
            ann = coco_annotation(det, i, (height, width), category_ids[label])
            ann.update(id=len(result.coco["annotations"]) + 1, image_id=image_id)
            result.coco["annotations"].append(ann)
            result.counts[label] += 1
        if previews is not None:
            save_preview(draw_preview(image, det, detector.labels), previews / rel)
    return result


def coco_annotation(det: Detections, i: int, hw: tuple[int, int], category_id: int) -> dict[str, Any]:
    """Detection ``i`` as a COCO result: bbox [x, y, w, h], score, and RLE when it has a mask."""
    x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
    ann: dict[str, Any] = {
        "category_id": category_id,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "score": float(det.scores[i]),
        "iscrowd": 0,
    }
    if det.masks:  # box models never load the RLE code
        from faster_coco_eval.core import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(det.full_mask(i, hw), dtype=np.uint8))
        ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        ann["area"] = float(mask_utils.area(rle))
    return ann


def coco_skeleton(detector: Detector, threshold: float | None) -> dict[str, Any]:
    """The results document before any image: model description and categories by label."""
    info = detector.info
    return {
        "info": {
            "model": str(detector.bundle_dir),
            "architecture": info.architecture,
            "threshold": threshold if threshold is not None else info.threshold,
            "class_thresholds": {} if threshold is not None else info.class_thresholds,
        },
        "images": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(info.labels)],
        "annotations": [],
    }


def draw_preview(image: np.ndarray, det: Detections, labels: list[str]) -> Image.Image:
    """The image with each detection's box (and mask, tinted) and ``label score`` drawn on it."""
    canvas = Image.fromarray(image)
    if det.masks:
        tint = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        for label, bitmap, (x1, y1, _, _) in zip(
            det.labels, det.masks, det.mask_boxes, strict=True
        ):
            colour = PALETTE[labels.index(label) % len(PALETTE)]
            piece = Image.new("RGBA", (bitmap.shape[1], bitmap.shape[0]), (*colour, 110))
            tint.paste(piece, (x1, y1), Image.fromarray(bitmap.astype(np.uint8) * 255))
        canvas = Image.alpha_composite(canvas.convert("RGBA"), tint).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for box, label, score in zip(det.boxes, det.labels, det.scores, strict=True):
        colour = PALETTE[labels.index(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 >= bottom - top + 2 else y1
        draw.rectangle((x1, ty, x1 + right - left + 2, ty + bottom - top + 2), fill=colour)
        draw.text((x1 + 1, ty), text, fill=(255, 255, 255))
    return canvas


def save_preview(image: Image.Image, path: Path) -> None:
    """Write atomically in the format the source's extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    atomic_write(path, lambda f: image.save(f, format=fmt))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically: readers see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(data).encode()))


def summary_lines(result: FolderPredictions, labels: list[str]) -> list[str]:
    """The human summary: images read, detections per label (every model label listed)."""
    coco = result.coco
    lines = [f"images: {len(coco['images'])}, detections: {len(coco['annotations'])}"]
    width = max(len(name) for name in labels)
    lines += [f"  {name:<{width}}  {result.counts.get(name, 0):>7}" for name in labels]
    if result.failures:
        lines.append(f"skipped {len(result.failures)} unreadable image(s):")
        lines += [f"  {reason}" for reason in result.failures]
    return lines
