"""Reader for "CVAT for images 1.1" annotations.xml (task and project exports).

A streaming expat parser: annotation files of big projects reach hundreds of megabytes and only
the start tags of images and shapes carry data, so inside images only start events are handled
(end and text events are switched on just for <attribute> and <skeleton>). Exports are untrusted:
any DTD or entity declaration is refused outright (CVAT never writes one), so nothing is ever
expanded or fetched.
"""

from __future__ import annotations

from pathlib import Path
from xml.parsers import expat

from serverless.errors import UserError
from trainer.data.readers.geometry import (
    bitmap_shape,
    ellipse_box,
    ellipse_polygon,
    finish,
    merge_groups,
    points_box,
    rotated_corners,
    rotated_envelope,
)
from trainer.data.readers.masks import decode_cvat_rle, parse_cvat_rle
from trainer.data.readers.parsed import DEGENERATE, ROTATED, ParsedExport
from trainer.data.records import ImageRecord, Shape

FORMAT = "CVAT for images 1.1"
#: Shapes that describe no detectable object: counted per kind, never trained on.
SKIPPED_SHAPES = {"points", "polyline", "cuboid", "skeleton", "tag"}


def read_cvat_xml(xml_path: Path, out: ParsedExport) -> None:
    """Parse ``xml_path`` into ``out`` (labels, images with shapes, skip counts)."""
    parser = expat.ParserCreate()
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    handler = _Handler(xml_path, out, parser)
    try:
        with open(xml_path, "rb") as fh:
            parser.ParseFile(fh)
    except expat.ExpatError as exc:
        raise UserError(f"{xml_path}: not well-formed XML ({exc})") from exc
    if not handler.seen_root:
        raise UserError(f"{xml_path}: no <annotations> root; expected a CVAT for images 1.1 file")
    handler.close_image()
    out.labels = list(dict.fromkeys(handler.labels))


class _Handler:
    """Expat callbacks in two phases: <meta> (labels, task subset), then images and shapes."""

    def __init__(self, xml_path: Path, out: ParsedExport, parser: expat.XMLParserType):
        self.xml_path, self.out, self.parser = xml_path, out, parser
        self.seen_root = False
        self.meta_path: list[str] = []
        self.text_parts: list[str] = []
        self.labels: list[str] = []
        self.label: dict[str, str] = {}
        self.task_subset = ""
        self.image: ImageRecord | None = None
        self.grouped = False  # the open image has shapes with a group id
        self.width = self.height = 0  # of the open image
        self.shape: Shape | None = None  # the shape whose <attribute>s may follow
        self.attribute = ""
        self.skeleton_depth = 0
        parser.StartDoctypeDeclHandler = self.refuse_dtd
        parser.EntityDeclHandler = self.refuse_dtd
        parser.ExternalEntityRefHandler = self.refuse_dtd
        parser.StartElementHandler = self.start_meta
        parser.EndElementHandler = self.end_meta
        parser.CharacterDataHandler = self.text_parts.append

    def refuse_dtd(self, *_args) -> None:
        raise UserError(
            f"{self.xml_path}: contains a DTD or entity declaration; CVAT never writes one, "
            "and it is refused so that nothing in the file can expand or fetch entities"
        )

    # ---------------------------------------------------------------- phase 1: root and meta

    def start_meta(self, name: str, attrs: dict[str, str]) -> None:
        if name == "image":  # meta is over: from here on, start events only
            self.parser.StartElementHandler = self.start
            self.parser.EndElementHandler = self.parser.CharacterDataHandler = None
            self.start(name, attrs)
        elif name == "annotations" and not self.meta_path:
            self.seen_root = True
        elif name == "track":
            self._refuse_track()
        else:
            self.meta_path.append(name)
            self.text_parts.clear()

    def end_meta(self, name: str) -> None:
        if not self.meta_path:
            return
        path, text = self.meta_path, "".join(self.text_parts)
        tail = tuple(path[-3:])
        if tail in (("labels", "label", "name"), ("labels", "label", "parent")):
            self.label[path[-1]] = text
        elif tail[-2:] == ("labels", "label"):
            if not self.label.get("parent") and self.label.get("name"):
                self.labels.append(self.label["name"])
            self.label = {}
        elif path[-3:] == ["meta", "task", "subset"]:
            self.task_subset = text.strip()
        path.pop()
        self.text_parts.clear()

    def _refuse_track(self) -> None:
        raise UserError(
            f"{self.xml_path}: contains <track> elements, i.e. a 'CVAT for video 1.1' export; "
            "export the task or project as 'CVAT for images 1.1' instead"
        )

    # ---------------------------------------------------------------- phase 2: images and shapes

    def start(self, name: str, attrs: dict[str, str]) -> None:
        build = _box if name == "box" else _BUILDERS.get(name)
        if build is not None and self.image is not None:
            try:
                self.shape = build(self, attrs)
            except (KeyError, ValueError) as exc:
                raise self._error(f"image {self.image.name!r}: invalid <{name}> ({exc})") from exc
        elif name == "image":
            self.close_image()
            self._open_image(attrs)
        elif name == "attribute" and self.shape is not None:
            self.attribute = attrs.get("name", "")
            self.text_parts.clear()
            self.parser.CharacterDataHandler = self.text_parts.append
            self.parser.EndElementHandler = self._end_attribute
        elif name in SKIPPED_SHAPES and self.image is not None:
            self.out.skipped[name] += 1
            self.shape = None
            if name == "skeleton":  # its <points> elements are parts of the skeleton
                self.skeleton_depth = 1
                self.parser.StartElementHandler = self._start_in_skeleton
                self.parser.EndElementHandler = self._end_in_skeleton
        elif name == "track":
            self._refuse_track()

    def _end_attribute(self, name: str) -> None:
        self.shape.attributes[self.attribute] = "".join(self.text_parts)
        self.parser.CharacterDataHandler = self.parser.EndElementHandler = None

    def _start_in_skeleton(self, name: str, attrs: dict[str, str]) -> None:
        self.skeleton_depth += 1

    def _end_in_skeleton(self, name: str) -> None:
        self.skeleton_depth -= 1
        if not self.skeleton_depth:
            self.parser.StartElementHandler, self.parser.EndElementHandler = self.start, None

    def _open_image(self, attrs: dict[str, str]) -> None:
        try:
            width, height = int(attrs["width"]), int(attrs["height"])
            name = attrs["name"]
        except (KeyError, ValueError) as exc:
            raise self._error(f"<image> needs name, width and height ({exc})") from exc
        if width <= 0 or height <= 0:
            raise self._error(f"image {name!r} has size {width}x{height}")
        task_id, frame = attrs.get("task_id"), attrs.get("id")
        self.image = ImageRecord(
            subset=attrs.get("subset") or self.task_subset or "default",
            name=name,
            width=width,
            height=height,
            path=None,
            task_id=int(task_id) if task_id else None,
            frame=int(frame) if frame else None,
        )
        self.shape, self.grouped = None, False
        self.width, self.height = width, height

    def close_image(self) -> None:
        image = self.image
        if image is None:
            return
        if self.grouped:
            image.shapes = merge_groups(image.shapes, image.width, image.height, self.out)
        self.out.images.append(image)
        self.image = None

    def add(self, shape: Shape | None, attrs: dict[str, str]) -> Shape | None:
        """Common shape attributes, clipping, then the shape joins the open image."""
        if shape is None:
            self.out.skipped[DEGENERATE] += 1
            return None
        if attrs.get("occluded") == "1":
            shape.occluded = True
        group = attrs.get("group_id")
        if group and group != "0":
            shape.group, self.grouped = int(group), True
        x0, y0, x1, y1 = shape.box
        inside = x0 >= 0 and y0 >= 0 and x1 <= self.width and y1 <= self.height
        if not (inside and x1 - x0 >= 1 and y1 - y0 >= 1):  # the rare case: clip or drop
            shape = finish(shape, self.width, self.height, self.out)
        if shape is not None:
            self.image.shapes.append(shape)
        return shape

    def _error(self, message: str) -> UserError:
        return UserError(f"{self.xml_path}, line {self.parser.CurrentLineNumber}: {message}")


def _box(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    x0, y0 = float(attrs["xtl"]), float(attrs["ytl"])
    x1, y1 = float(attrs["xbr"]), float(attrs["ybr"])
    rotation = attrs.get("rotation")
    if rotation and float(rotation) % 360:
        h.out.notes[ROTATED] += 1
        box = rotated_envelope(x0, y0, x1, y1, float(rotation))
        ring = rotated_corners(x0, y0, x1, y1, float(rotation))
        return h.add(Shape(attrs["label"], "rectangle", box, float(rotation), polygons=[ring]), attrs)
    # The common case, kept short (it runs once per box): plain, inside, not occluded, no group.
    if (
        0 <= x0 <= x1 - 1 <= h.width - 1
        and 0 <= y0 <= y1 - 1 <= h.height - 1
        and attrs.get("occluded") != "1"
        and not attrs.get("group_id")
    ):
        shape = Shape(attrs["label"], "rectangle", (x0, y0, x1, y1))
        h.image.shapes.append(shape)
        return shape
    return h.add(Shape(attrs["label"], "rectangle", (x0, y0, x1, y1)), attrs)


def _polygon(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    flat = [float(v) for pair in attrs["points"].split(";") for v in pair.split(",")]
    if len(flat) < 6 or len(flat) % 2:
        raise ValueError(f"a polygon needs at least 3 x,y points, got {attrs['points']!r}")
    return h.add(Shape(attrs["label"], "polygon", points_box(flat), polygons=[flat]), attrs)


def _mask(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    left, top = int(float(attrs["left"])), int(float(attrs["top"]))
    width, height = int(float(attrs["width"])), int(float(attrs["height"]))
    bitmap = decode_cvat_rle(parse_cvat_rle(attrs["rle"]), width, height)
    return h.add(bitmap_shape(bitmap, left, top, label=attrs["label"]), attrs)


def _ellipse(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    cx, cy = float(attrs["cx"]), float(attrs["cy"])
    rx, ry = float(attrs["rx"]), float(attrs["ry"])
    rotation = float(attrs.get("rotation", 0.0))
    box = ellipse_box(cx, cy, rx, ry, rotation)
    ring = ellipse_polygon(cx, cy, rx, ry, rotation)
    return h.add(Shape(attrs["label"], "ellipse", box, rotation, polygons=[ring]), attrs)


_BUILDERS = {"box": _box, "polygon": _polygon, "mask": _mask, "ellipse": _ellipse}
