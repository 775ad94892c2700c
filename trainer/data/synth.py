"""Synthetic CVAT project exports: coloured particles on a textured background.

Tests, demos and benchmarks need exports that look exactly like what a CVAT 2.x server writes
("CVAT for images 1.1" and "COCO 1.0" project exports with images) but are small, seeded and
easy to learn (one colour and shape per label). Every shape kind CVAT exports can be produced,
so the readers are exercised on the structures a real server emits. Same seed -> same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import XMLGenerator

import numpy as np
from faster_coco_eval.core import mask as mask_utils
from PIL import Image, ImageDraw

SHAPE_MODES = ("box", "polygon", "mask", "mixed")
FORMATS = ("cvat", "coco")
#: File or folder name (without .zip) of each format's export.
EXPORT_NAMES = {"cvat": "synth_cvat11", "coco": "synth_coco10"}
SUBSETS = ("Train", "Validation")
KINDS = ("circle", "square", "triangle")
COLOURS = (
    (225, 40, 40),
    (40, 80, 235),
    (245, 225, 30),
    (40, 205, 70),
    (215, 50, 225),
    (30, 220, 225),
)
_TIMESTAMP = "2024-01-01 00:00:00.000000+00:00"
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)


@dataclass
class _Particle:
    label: str
    kind: str
    cx: float
    cy: float
    size: float
    angle: float  # degrees, clockwise in image coordinates
    colour: int  # index into COLOURS (the label's index)

    def outline(self) -> np.ndarray:
        """Polygon vertices (N x 2) of the particle as drawn."""
        n = {"circle": 24, "square": 4, "triangle": 3}[self.kind]
        start = {"circle": 0.0, "square": 45.0, "triangle": -90.0}[self.kind]
        radius = self.size / 2 * (math.sqrt(2) if self.kind == "square" else 1.0)
        t = np.radians(start + self.angle + np.arange(n) * 360.0 / n)
        return np.stack([self.cx + radius * np.cos(t), self.cy + radius * np.sin(t)], axis=1)

    def inside(self, width: int, height: int) -> bool:
        xy = self.outline()
        return bool(xy.min() >= 0 and xy[:, 0].max() <= width and xy[:, 1].max() <= height)


@dataclass
class _Ann:
    """One CVAT shape as the server stores it (points in CVAT's own layout)."""

    type: str  # rectangle, polygon, mask, ellipse, points, tag
    label: str
    points: list[float] = field(default_factory=list)
    rotation: float = 0.0
    group: int = 0
    mask: np.ndarray | None = None  # full-image bool mask (mask type)


@dataclass
class _Image:
    subset: str
    task_id: int
    frame: int
    name: str
    width: int
    height: int
    jpeg: bytes
    anns: list[_Ann]


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train: int = 24,
    val: int = 8,
    empty: int = 4,
    size: tuple[int, int] = (320, 240),
    labels: Sequence[str] = ("circle", "square", "triangle"),
    shapes: str = "box",
    formats: Iterable[str] = FORMATS,
    zipped: bool = True,
) -> dict[str, Path]:
    """Write project exports of one synthetic project; returns {format: export path}."""
    formats = tuple(formats)
    if shapes not in SHAPE_MODES:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_MODES)}, got {shapes!r}")
    if unknown := set(formats) - set(FORMATS):
        raise ValueError(f"formats must be among {', '.join(FORMATS)}, got {sorted(unknown)}")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError("labels must be a non-empty list of unique names")
    images = _make_images(
        np.random.default_rng(seed), train, val, empty, size, list(labels), shapes
    )
    writers = {"cvat": _cvat_files, "coco": _coco_files}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt in formats:
        files = writers[fmt](images, list(labels))
        target = out_dir / (EXPORT_NAMES[fmt] + (".zip" if zipped else ""))
        (_write_zip if zipped else _write_tree)(target, files)
        written[fmt] = target
    return written


def _make_images(rng, train, val, empty, size, labels, shapes) -> list[_Image]:
    plan = [("Train", train, (empty + 1) // 2), ("Validation", val, empty // 2)]
    images, index = [], 0
    for task_id, (subset, annotated, blank) in enumerate(plan, start=1):
        for frame in range(annotated + blank):
            index += 1
            particles = _place(rng, size, labels, shapes) if frame < annotated else []
            pixels = _render(rng, size, particles)
            anns = _annotate(rng, particles, size, shapes)
            images.append(
                _Image(subset, task_id, frame, f"synth_{index:05d}.jpg", *size, pixels, anns)
            )
    return images


def _place(rng, size, labels, shapes) -> list[_Particle]:
    """Non-overlapping particles, about one in five cut by an image border."""
    width, height = size
    particles: list[_Particle] = []
    for _ in range(int(rng.integers(2, 7))):
        for _attempt in range(50):
            i = int(rng.integers(len(labels)))
            s = float(rng.uniform(15, min(60, min(width, height) / 3)))
            if rng.random() < 0.2:  # touching a border; the centre stays inside
                cx, cy = _border_position(rng, width, height, s)
            else:
                cx = float(rng.uniform(s / 2 + 2, width - s / 2 - 2))
                cy = float(rng.uniform(s / 2 + 2, height - s / 2 - 2))
            if all(math.hypot(cx - p.cx, cy - p.cy) > 0.75 * (s + p.size) for p in particles):
                kind = KINDS[i % len(KINDS)]
                angle = 0.0 if shapes == "box" and kind == "square" else float(rng.uniform(0, 90))
                particles.append(_Particle(labels[i], kind, cx, cy, s, angle, i))
                break
    return particles


def _border_position(rng, width, height, s) -> tuple[float, float]:
    edge = int(rng.integers(4))
    offset = float(rng.uniform(0, s / 2))
    along_x, along_y = float(rng.uniform(s, width - s)), float(rng.uniform(s, height - s))
    spots = [(offset, along_y), (width - offset, along_y), (along_x, offset)]
    return [*spots, (along_x, height - offset)][edge]


def _raster(particle: _Particle, size) -> np.ndarray:
    canvas = Image.new("1", size, 0)
    draw = ImageDraw.Draw(canvas)
    if particle.kind == "circle":
        r = particle.size / 2
        draw.ellipse([particle.cx - r, particle.cy - r, particle.cx + r, particle.cy + r], fill=1)
    else:
        draw.polygon([tuple(p) for p in particle.outline()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _render(rng, size, particles) -> bytes:
    """JPEG of a noisy textured background with each particle in its label's colour."""
    width, height = size
    coarse = rng.uniform(70, 170, size=(height // 16 + 2, width // 16 + 2)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize(size, Image.BICUBIC))
    rgb = texture[:, :, None] * np.array([0.9, 1.0, 0.85], dtype=np.float32)
    rgb = rgb + rng.normal(0, 10, size=(height, width, 3)).astype(np.float32)
    for p in particles:
        colour = np.array(COLOURS[p.colour % len(COLOURS)], dtype=np.float32)
        rgb[_raster(p, size)] = colour * float(rng.uniform(0.85, 1.0))
    rgb = rgb + rng.normal(0, 6, size=rgb.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _annotate(rng, particles, size, shapes) -> list[_Ann]:
    anns: list[_Ann] = []
    group = 0
    for p in particles:
        kind = shapes if shapes != "mixed" else _mixed_choice(rng, p, size)
        group += kind == "group"
        anns.extend(_shape_anns(p, kind, size, group))
    if shapes == "mixed" and particles:
        anns.append(_Ann("points", particles[0].label, [particles[0].cx, particles[0].cy]))
        anns.append(_Ann("tag", particles[-1].label))
    return anns


def _mixed_choice(rng, p: _Particle, size) -> str:
    inside = p.inside(*size)
    options = {
        "circle": ["box", "mask", "polygon"] + (["ellipse"] if inside else []),
        "square": ["box", "polygon", "mask"] + (["rotated"] if inside else []),
        "triangle": ["box", "polygon", "mask", "group"],
    }[p.kind]
    return options[int(rng.integers(len(options)))]


def _shape_anns(p: _Particle, kind: str, size, group: int) -> list[_Ann]:
    width, height = size
    raster = _raster(p, size)
    ys, xs = np.nonzero(raster)
    bounds = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    outline = np.clip(p.outline(), 0, [width, height]).ravel().round(2).tolist()
    h = p.size / 2
    if kind == "box":
        return [_Ann("rectangle", p.label, bounds)]
    if kind == "rotated":
        corners = [round(v, 2) for v in (p.cx - h, p.cy - h, p.cx + h, p.cy + h)]
        return [_Ann("rectangle", p.label, corners, round(p.angle, 2))]
    if kind == "polygon":
        return [_Ann("polygon", p.label, outline)]
    if kind == "mask":
        return [_Ann("mask", p.label, mask=raster)]
    if kind == "ellipse":
        return [_Ann("ellipse", p.label, [p.cx, p.cy, p.cx + h, p.cy - h])]
    return [
        _Ann("rectangle", p.label, bounds, group=group),
        _Ann("polygon", p.label, outline, 0, group),
    ]


# ---------------------------------------------------------------- CVAT for images 1.1


def _cvat_files(images: list[_Image], labels: list[str]) -> dict[str, bytes]:
    buf = io.BytesIO()
    xml = _XmlWriter(buf)
    xml.open("annotations", {})
    xml.leaf("version", "1.1")
    xml.tree("meta", _project_meta(images, labels))
    for im in images:
        attrs = {"id": str(im.frame), "name": im.name, "subset": im.subset}
        attrs |= {"task_id": str(im.task_id), "width": str(im.width), "height": str(im.height)}
        xml.open("image", attrs)
        for ann in im.anns:
            xml.open(*_cvat_shape(ann))
            xml.close()
        xml.close()
    xml.close()
    xml.end()
    files = {"annotations.xml": buf.getvalue()}
    files |= {f"images/{im.subset}/{im.name}": im.jpeg for im in images}
    return files


def _project_meta(images: list[_Image], labels: list[str]) -> list:
    tasks = []
    for task_id, subset in enumerate(SUBSETS, start=1):
        size = sum(1 for im in images if im.task_id == task_id)
        segment = [("id", str(task_id)), ("start", "0"), ("stop", str(size - 1))]
        segment.append(("url", f"http://localhost:8080/api/jobs/{task_id}"))
        tasks.append(
            ("task", [
                ("id", str(task_id)), ("name", f"synth-{subset.lower()}"), ("size", str(size)),
                ("mode", "annotation"), ("overlap", "0"), ("bugtracker", ""),
                ("created", _TIMESTAMP), ("updated", _TIMESTAMP), ("subset", subset),
                ("start_frame", "0"), ("stop_frame", str(size - 1)), ("frame_filter", ""),
                ("segments", [("segment", segment)]),
                ("owner", [("username", "admin"), ("email", "admin@example.com")]),
                ("assignee", ""),
            ])
        )  # fmt: skip
    label_items = [
        ("label", [("name", name), ("color", _hex(COLOURS[i % len(COLOURS)])),
                   ("type", "any"), ("attributes", [])])
        for i, name in enumerate(labels)
    ]  # fmt: skip
    project = [
        ("id", "1"), ("name", "synth"), ("bugtracker", ""), ("created", _TIMESTAMP),
        ("updated", _TIMESTAMP), ("tasks", tasks), ("subsets", "\n".join(SUBSETS)),
        ("owner", [("username", "admin"), ("email", "admin@example.com")]), ("assignee", ""),
        ("labels", label_items),
    ]  # fmt: skip
    return [("project", project), ("dumped", _TIMESTAMP)]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{v:02x}" for v in rgb)


def _cvat_shape(ann: _Ann) -> tuple[str, dict[str, str]]:
    """Element name and attributes in the order CVAT's XML dumper writes them."""
    attrs = {"label": ann.label, "source": "manual"}
    if ann.type == "tag":
        return "tag", attrs
    attrs["occluded"] = "0"
    p = ann.points
    if ann.type == "rectangle":
        attrs |= dict(zip(("xtl", "ytl", "xbr", "ybr"), (f"{v:.2f}" for v in p), strict=True))
    elif ann.type == "ellipse":
        attrs |= {"cx": f"{p[0]:.2f}", "cy": f"{p[1]:.2f}"}
        attrs |= {"rx": f"{p[2] - p[0]:.2f}", "ry": f"{p[1] - p[3]:.2f}"}
    elif ann.type == "mask":
        attrs |= _cvat_mask(ann.mask)
    else:
        attrs["points"] = ";".join(f"{x:.2f},{y:.2f}" for x, y in zip(p[::2], p[1::2], strict=True))
    if ann.rotation:
        attrs["rotation"] = f"{ann.rotation:.2f}"
    attrs["z_order"] = "0"
    if ann.group:
        attrs["group_id"] = str(ann.group)
    return {"rectangle": "box"}.get(ann.type, ann.type), attrs


def cvat_rle(bitmap: np.ndarray) -> list[int]:
    """CVAT's mask RLE: run lengths over the row-major bitmap, alternating 0/1, starting with 0."""
    flat = np.asarray(bitmap, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def _cvat_mask(full: np.ndarray) -> dict[str, str]:
    ys, xs = np.nonzero(full)
    left, top, right, bottom = xs.min(), ys.min(), xs.max(), ys.max()
    rle = cvat_rle(full[top : bottom + 1, left : right + 1])
    return {
        "rle": ", ".join(str(v) for v in rle),
        "left": str(left),
        "top": str(top),
        "width": str(right - left + 1),
        "height": str(bottom - top + 1),
    }


class _XmlWriter:
    """CVAT's XML layout: two-space indent, closing tags of shapes on their own line."""

    def __init__(self, buf: io.BytesIO):
        self.gen = XMLGenerator(buf, "utf-8")
        self.gen.startDocument()
        self.stack: list[str] = []

    def _indent(self) -> None:
        if self.stack:
            self.gen.ignorableWhitespace("\n" + "  " * len(self.stack))

    def open(self, name: str, attrs: dict[str, str]) -> None:
        self._indent()
        self.gen.startElement(name, attrs)
        self.stack.append(name)

    def close(self) -> None:
        name = self.stack.pop()
        self.gen.ignorableWhitespace("\n" + "  " * len(self.stack))
        self.gen.endElement(name)

    def leaf(self, name: str, text: str) -> None:
        self._indent()
        self.gen.startElement(name, {})
        self.gen.characters(text)
        self.gen.endElement(name)

    def tree(self, name: str, items: list) -> None:
        self.open(name, {})
        for key, value in items:
            if isinstance(value, list):
                self.tree(key, value)
            else:
                self.leaf(key, value)
        self.close()

    def end(self) -> None:
        self.gen.ignorableWhitespace("\n")
        self.gen.endDocument()


# ---------------------------------------------------------------- COCO 1.0


def _coco_files(images: list[_Image], labels: list[str]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    image_id = 0
    annotation_files = {}
    for subset in SUBSETS:
        doc = {
            "licenses": [{"name": "", "id": 0, "url": ""}],
            "info": dict.fromkeys(("contributor", "date_created", "description", "url"), "")
            | {"version": "", "year": ""},
            "categories": [
                {"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(labels)
            ],
            "images": [],
            "annotations": [],
        }
        for im in (im for im in images if im.subset == subset):
            image_id += 1
            doc["images"].append(_coco_image(im, image_id))
            for ann in _coco_instances(im, labels):
                ann = {"id": len(doc["annotations"]) + 1, "image_id": image_id} | ann
                doc["annotations"].append(ann)
            files[f"images/{subset}/{im.name}"] = im.jpeg
        annotation_files[f"annotations/instances_{subset}.json"] = json.dumps(doc).encode()
    return files | annotation_files


def _coco_image(im: _Image, image_id: int) -> dict:
    return {
        "id": image_id,
        "width": im.width,
        "height": im.height,
        "file_name": im.name,
        "license": 0,
        "flickr_url": "",
        "coco_url": "",
        "date_captured": 0,
    }


def _coco_instances(im: _Image, labels: list[str]) -> list[dict]:
    """CVAT's COCO export: masks and ellipses become crowd RLE, a group becomes one object.

    A group is merged as datumaro's ``CocoExporter.find_instance_parts`` does for CVAT: the
    largest part (box w*h, polygon shoelace, mask pixels; boxes first on a tie) gives label and
    attributes, the box is the union of the group's boxes (of all parts when it has none), and
    the outline is one RLE when a mask of the leader's label is in the group, else the polygons.
    """
    groups: dict[int, list[_Ann]] = {}
    for i, ann in enumerate(im.anns):
        if ann.type not in ("points", "tag"):
            groups.setdefault(ann.group or -1 - i, []).append(ann)
    out = []
    for parts in groups.values():
        boxes = [a for a in parts if a.type == "rectangle"]
        rings = [a.points for a in parts if a.type == "polygon"]
        masks = [_full_mask(a, im.width, im.height) for a in parts if a.type in ("mask", "ellipse")]
        ordered = boxes + [a for a in parts if a.type == "polygon"] + [
            a for a in parts if a.type in ("mask", "ellipse")]  # fmt: skip
        leader = max(ordered, key=lambda a: _area(a, im))
        entry = {"category_id": labels.index(leader.label) + 1}
        bounds = [a.points for a in boxes] or [_bounds(a, im) for a in parts]
        bbox = _xywh([min(b[0] for b in bounds), min(b[1] for b in bounds),
                      max(b[2] for b in bounds), max(b[3] for b in bounds)])  # fmt: skip
        if any(a.label == leader.label for a in parts if a.type in ("mask", "ellipse")):
            union = np.logical_or.reduce([*masks, *(_polygon_mask(r, im) for r in rings)])
            entry |= _coco_rle(union) | {"bbox": bbox}
        elif rings:
            rles = mask_utils.frPyObjects(rings, im.height, im.width)
            area = float(mask_utils.area(mask_utils.merge(rles)))
            entry |= {"segmentation": rings, "area": area, "bbox": bbox, "iscrowd": 0}
        else:
            entry |= {"segmentation": [], "area": bbox[2] * bbox[3], "bbox": bbox, "iscrowd": 0}
        attributes = {"occluded": False}
        if leader.type in ("rectangle", "ellipse"):  # ellipses since CVAT 2.37
            attributes["rotation"] = float(leader.rotation)
        out.append(entry | {"attributes": attributes})
    return out


def _area(ann: _Ann, im: _Image) -> float:
    """datumaro's get_area: Bbox w*h, Polygon shoelace, Mask pixel count."""
    if ann.type == "rectangle":
        x0, y0, x1, y1 = ann.points
        return (x1 - x0) * (y1 - y0)
    if ann.type == "polygon":
        x, y = np.asarray(ann.points[0::2]), np.asarray(ann.points[1::2])
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2
    return float(_full_mask(ann, im.width, im.height).sum())


def _bounds(ann: _Ann, im: _Image) -> list[float]:
    """xyxy as datumaro's get_bbox: the points' extremes, a mask's pixel extents."""
    if ann.type in ("rectangle", "polygon"):
        xs, ys = ann.points[0::2], ann.points[1::2]
        return [min(xs), min(ys), max(xs), max(ys)]
    ys, xs = np.nonzero(_full_mask(ann, im.width, im.height))
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _polygon_mask(ring: list[float], im: _Image) -> np.ndarray:
    rle = mask_utils.frPyObjects([ring], im.height, im.width)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _xywh(xyxy: list[float]) -> list[float]:
    x0, y0, x1, y1 = xyxy
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _full_mask(ann: _Ann, width: int, height: int) -> np.ndarray:
    if ann.type == "mask":
        return ann.mask
    cx, cy, right, top = ann.points
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).ellipse([2 * cx - right, top, right, 2 * cy - top], fill=1)
    return np.asarray(canvas, dtype=bool)


def coco_rle(bitmap: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs starting with 0) as CVAT writes for crowd masks."""
    return {"counts": cvat_rle(np.asarray(bitmap).T), "size": list(bitmap.shape)}


def _coco_rle(full: np.ndarray) -> dict:
    ys, xs = np.nonzero(full)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1)]
    bbox.append(float(ys.max() - ys.min() + 1))
    return {"segmentation": coco_rle(full), "area": float(full.sum()), "bbox": bbox, "iscrowd": 1}


# ---------------------------------------------------------------- writing


def _write_zip(target: Path, files: dict[str, bytes]) -> None:
    """Stored entries with fixed timestamps (as CVAT writes them): same input, same bytes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.create_system = 3
                zf.writestr(info, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_tree(target: Path, files: dict[str, bytes]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
