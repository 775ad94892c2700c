"""Reader for CVAT's "COCO 1.0" exports (annotations/instances_<subset>.json).

CVAT writes every mask and ellipse as ``iscrowd: 1`` with an RLE segmentation: here that is an
ordinary object, not a COCO crowd region. Labels are taken by category name (ids change whenever
labels change in CVAT); rotated boxes carry ``attributes.rotation`` and become their envelope.
Groups arrive merged, with the box CVAT chose (``bbox``), which is kept for every kind of
segmentation. Categories list every CVAT label, tag and skeleton labels included: a category that
is another's ``supercategory`` is a skeleton, and its children are its points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from serverless.errors import UserError
from trainer.data.readers.geometry import bitmap_shape, finish, points_box, rotated_box
from trainer.data.readers.masks import coco_rle_window
from trainer.data.readers.parsed import (
    DEGENERATE,
    ROTATED,
    SKELETON_LABEL,
    ParsedExport,
    name_problem,
    skeleton_point,
)
from trainer.data.records import ImageRecord, Shape

FORMAT = "COCO 1.0"
_RESERVED_ATTRIBUTES = {"occluded", "rotation", "track_id", "keyframe"}


def subset_of(json_path: Path) -> str:
    """instances_Train.json -> "Train"; any other name -> "default"."""
    stem = json_path.stem
    subset = stem[len("instances_") :] if stem.startswith("instances_") else ""
    return subset or "default"


def read_coco(json_paths: list[Path], out: ParsedExport) -> None:
    """Parse each instances file into ``out``; label order is the categories' order."""
    for path in json_paths:
        _read_one(path, out)


def _read_one(path: Path, out: ParsedExport) -> None:
    """One instances_<subset>.json: its categories, images and annotations."""
    doc = _load(path)
    categories = _categories(path, doc, out)
    images = _images(path, doc, subset_of(path))
    annotations = doc.get("annotations") or []
    if not isinstance(annotations, list):
        raise UserError(f"{path}: 'annotations' must be a list")
    for ann in annotations:
        try:
            image = images[ann["image_id"]]
            label = categories[ann["category_id"]]
        except (KeyError, TypeError) as exc:
            raise _error(path, ann, f"unknown or missing image_id/category_id ({exc!r})") from exc
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


def _categories(path: Path, doc: dict, out: ParsedExport) -> dict[int | str, str]:
    """{category id: label name}; labels join ``out`` in category order, skeletons marked."""
    categories, parents = {}, {}
    for i, entry in enumerate(doc.get("categories") or []):
        try:
            ident, name = entry["id"], str(entry["name"])
            categories[_key(ident)] = name
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: categories[{i}] needs a number 'id' and a 'name' ({exc!r})") from exc
        if not name.strip():
            raise UserError(f"{path}: categories[{i}] (id {ident!r}) has an empty 'name'")
        if entry.get("supercategory"):
            parents[name] = str(entry["supercategory"])
        if name not in out.labels:
            out.labels.append(name)
    for name, parent in parents.items():
        if parent in parents.values() and parent in categories.values():  # CVAT: a skeleton's points
            out.label_kinds.setdefault(name, skeleton_point(parent))
            out.label_kinds.setdefault(parent, SKELETON_LABEL)
    return categories


def _images(path: Path, doc: dict, subset: str) -> dict[int | str, ImageRecord]:
    images = {}
    for i, entry in enumerate(doc["images"]):
        try:
            ident, name = _key(entry["id"]), entry["file_name"]
            width, height = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: images[{i}] needs id, file_name, width and height ({exc!r})") from exc
        if not isinstance(name, str) or (problem := name_problem(name)):
            raise UserError(f"{path}: images[{i}] (id {ident!r}): file_name {name!r} "
                            f"{problem if isinstance(name, str) else 'is not text'}")  # fmt: skip
        if width <= 0 or height <= 0:
            raise UserError(f"{path}: image {name!r} has size {width}x{height}")
        if ident in images:
            raise UserError(
                f"{path}: images[{i}] ({name!r}) has id {ident!r}, the id of {images[ident].name!r}"
            )
        images[ident] = ImageRecord(subset, name, width, height, None)
    return images


def _key(ident) -> int | str:
    """An id as a dict key: a whole number or a non-empty string, as tools write them."""
    if isinstance(ident, bool) or not isinstance(ident, (int, str)) or ident == "":
        raise TypeError(f"id {ident!r} is not a number")
    return ident


def _shape(ann: dict, label: str, image: ImageRecord, out: ParsedExport) -> Shape | None:
    attrs = ann.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise ValueError(f"'attributes' must be an object, got {attrs!r:.60}")
    seg = ann.get("segmentation")
    ident = ann.get("id")
    common = {
        "label": label,
        "occluded": bool(attrs.get("occluded", False)),
        "attributes": {str(k): _text(v) for k, v in attrs.items() if k not in _RESERVED_ATTRIBUTES},
        # crop file names use it: only a whole number is taken (others: the shape's index)
        "object_id": ident if isinstance(ident, int) and not isinstance(ident, bool) else None,
    }
    if isinstance(seg, dict):
        window = coco_rle_window(seg, image.width, image.height)
        shape = bitmap_shape(window[0], window[1], 0, **common) if window is not None else None
        if shape is None:
            out.skip(DEGENERATE, label)
            return None
        if ann.get("bbox"):  # CVAT's box: the group's, or the mask's own pixel extents
            shape.box = _bbox(ann)
    elif seg:
        rings = [[float(v) for v in ring] for ring in seg]
        if any(len(r) < 6 or len(r) % 2 or not all(map(math.isfinite, r)) for r in rings):
            raise ValueError("every polygon needs at least 3 x,y points, all finite numbers")
        box = _bbox(ann) if ann.get("bbox") else points_box([v for r in rings for v in r])
        shape = Shape(kind="polygon", box=box, polygons=rings, **common)
    else:
        rotation = float(attrs.get("rotation") or 0.0)
        if rotation % 360:
            out.notes[ROTATED] += 1
            shape = rotated_box(*_bbox(ann), rotation, **common)
        else:
            shape = Shape(kind="rectangle", box=_bbox(ann), **common)
    return finish(shape, image.width, image.height, out)


def _bbox(ann: dict) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in ann["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bbox {ann['bbox']!r} holds a number that is not finite")
    return (x, y, x + w, y + h)


def _text(value) -> str:
    """Attribute values as CVAT's XML writes them (checkboxes are "true"/"false")."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _error(path: Path, ann: dict, message: str) -> UserError:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    return UserError(f"{path}: annotation id {ann_id}: {message}")
