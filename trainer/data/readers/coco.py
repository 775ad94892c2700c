"""Reader for CVAT's "COCO 1.0" exports (annotations/instances_<subset>.json).

CVAT writes every mask and ellipse as ``iscrowd: 1`` with an RLE segmentation: here that is an
ordinary object, not a COCO crowd region. Labels are taken by category name (ids change whenever
labels change in CVAT); rotated boxes carry ``attributes.rotation`` and become their envelope.
"""

from __future__ import annotations

import json
from pathlib import Path

from serverless.errors import UserError
from trainer.data.readers.geometry import bitmap_shape, finish, points_box, rotated_corners, rotated_envelope
from trainer.data.readers.masks import decode_coco_rle
from trainer.data.readers.parsed import DEGENERATE, ROTATED, ParsedExport
from trainer.data.records import ImageRecord, Shape

FORMAT = "COCO 1.0"
_RESERVED_ATTRIBUTES = {"occluded", "rotation", "track_id", "keyframe"}


def subset_of(json_path: Path) -> str:
    """instances_Train.json -> "Train"; any other name -> "default"."""
    stem = json_path.stem
    return stem[len("instances_") :] if stem.startswith("instances_") else "default"


def read_coco(json_paths: list[Path], out: ParsedExport) -> None:
    """Parse each instances file into ``out``; label order is the categories' order."""
    for path in json_paths:
        _read_one(path, out)


def _read_one(path: Path, out: ParsedExport) -> None:
    """One instances_<subset>.json: its categories, images and annotations."""
    doc = _load(path)
    categories = _categories(path, doc)
    out.labels.extend(n for n in categories.values() if n not in out.labels)
    images = _images(path, doc, subset_of(path))
    for ann in doc.get("annotations") or []:
        try:
            image = images[ann["image_id"]]
            label = categories[ann["category_id"]]
        except (KeyError, TypeError) as exc:
            raise _error(path, ann, f"unknown or missing image_id/category_id ({exc})") from exc
        try:
            shape = _shape(ann, label, image, out)
        except (KeyError, TypeError, ValueError) as exc:
            raise _error(path, ann, str(exc)) from exc
        if shape is not None:
            image.shapes.append(shape)
    out.images.extend(images.values())


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable COCO JSON file ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise UserError(
            f"{path}: expected a COCO object with 'images', 'annotations', 'categories'"
        )
    return doc


def _categories(path: Path, doc: dict) -> dict[int, str]:
    try:
        return {c["id"]: str(c["name"]) for c in doc.get("categories") or []}
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: every category needs 'id' and 'name' ({exc})") from exc


def _images(path: Path, doc: dict, subset: str) -> dict[int, ImageRecord]:
    images = {}
    for entry in doc["images"]:
        try:
            width, height = int(entry["width"]), int(entry["height"])
            record = ImageRecord(subset, str(entry["file_name"]), width, height, None)
            images[entry["id"]] = record
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: image entry {entry!r:.120} needs id, file_name, width, "
                            f"height ({exc})") from exc  # fmt: skip
        if width <= 0 or height <= 0:
            raise UserError(f"{path}: image {record.name!r} has size {width}x{height}")
    return images


def _shape(ann: dict, label: str, image: ImageRecord, out: ParsedExport) -> Shape | None:
    attrs = ann.get("attributes") or {}
    seg = ann.get("segmentation")
    common = {
        "label": label,
        "occluded": bool(attrs.get("occluded", False)),
        "attributes": {k: _text(v) for k, v in attrs.items() if k not in _RESERVED_ATTRIBUTES},
        "object_id": ann.get("id"),
    }
    if isinstance(seg, dict):
        bitmap = decode_coco_rle(seg, image.width, image.height)
        shape = bitmap_shape(bitmap, 0, 0, **common)
        if shape is None:
            out.skipped[DEGENERATE] += 1
            return None
    elif seg:
        rings = [[float(v) for v in ring] for ring in seg]
        if any(len(r) < 6 or len(r) % 2 for r in rings):
            raise ValueError("every polygon needs at least 3 x,y points")
        box = _bbox(ann) if ann.get("bbox") else points_box([v for r in rings for v in r])
        shape = Shape(kind="polygon", box=box, polygons=rings, **common)
    else:
        box = _bbox(ann)
        rotation = float(attrs.get("rotation") or 0.0)
        rings = None
        if rotation % 360:
            out.notes[ROTATED] += 1
            rings = [rotated_corners(*box, rotation)]
            box = rotated_envelope(*box, rotation)
        shape = Shape(kind="rectangle", box=box, rotation=rotation, polygons=rings, **common)
    return finish(shape, image.width, image.height, out)


def _bbox(ann: dict) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in ann["bbox"])
    return (x, y, x + w, y + h)


def _text(value) -> str:
    """Attribute values as CVAT's XML writes them (checkboxes are "true"/"false")."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _error(path: Path, ann: dict, message: str) -> UserError:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    return UserError(f"{path}: annotation id {ann_id}: {message}")
