"""Reader for CVAT's annotations.xml: "CVAT for images 1.1" and "CVAT for video 1.1", of tasks,
jobs and projects.

A streaming expat parser: annotation files of big projects reach hundreds of megabytes and only
the start tags of images and shapes carry data, so after ``<meta>`` only start events are handled
(end and text events are switched on just for ``<attribute>``, ``<skeleton>`` and ``<track>``).
Exports are untrusted: any DTD or entity declaration is refused outright (CVAT never writes one), so
nothing is ever expanded or fetched.

"CVAT for images" lists every frame as an ``<image>``; a video task's frames are named
``frame_000000`` without the extension of their file (``images/frame_000000.PNG``), which the
reader adds. "CVAT for video" has no ``<image>`` at all: each ``<track>`` lists its shape on every
frame it spans (interpolated frames written out, ``outside="1"`` where it is not visible), and
frames and their size come from ``<meta>`` (:mod:`trainer.data.readers.cvat_meta`). Tracks become
per-frame objects; nothing is propagated beyond what CVAT wrote.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from xml.parsers import expat

from serverless.errors import UserError
from trainer.data.readers.cvat_meta import Meta, MetaReader, Unit
from trainer.data.readers.geometry import (
    bitmap_shape,
    ellipse_bitmap,
    ellipse_box,
    ellipse_polygon,
    finish,
    points_box,
    rotated_box,
)
from trainer.data.readers.groups import merge_groups
from trainer.data.readers.masks import decode_cvat_rle, parse_cvat_rle
from trainer.data.readers.parsed import DEGENERATE, ROTATED, ParsedExport, name_problem
from trainer.data.records import ImageRecord, Shape

FORMAT = "CVAT for images 1.1"
VIDEO_FORMAT = "CVAT for video 1.1"
#: Shapes that describe no detectable object: counted per kind, never trained on.
SKIPPED_SHAPES = {"points", "polyline", "cuboid", "skeleton", "tag"}
#: The file extension CVAT gives video frames (``VIDEO_FRAME_EXT`` in CVAT's frame provider).
VIDEO_FRAME_EXT = ".PNG"
_FRAME_NAME = re.compile(r"frame_\d{6,}")


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
        raise UserError(f"{xml_path}: no <annotations> root; expected a CVAT for images/video 1.1 file")
    handler.close()


class _Handler:
    """Expat callbacks in two phases: <meta>, then images (or tracks) with their shapes."""

    def __init__(self, xml_path: Path, out: ParsedExport, parser: expat.XMLParserType):
        self.xml_path, self.out, self.parser = xml_path, out, parser
        self.seen_root = False
        self.meta_path: list[str] = []
        self.text_parts: list[str] = []
        self.meta_reader: MetaReader | None = MetaReader()
        self.meta = Meta()
        self.image: ImageRecord | None = None  # the open <image>, or a track's current frame
        self.width = self.height = 0  # of self.image
        self.shape: Shape | None = None  # the shape whose <attribute>s may follow
        self.attribute = ""
        self.track: dict[str, str] | None = None  # attributes of the open <track>
        self.frames: dict[tuple[int | None, int], ImageRecord] = {}  # video format: (task, frame)
        self.skeleton_depth = 0
        self.start_default, self.end_default = self.start, None
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
        if name in ("image", "track"):  # meta is over: from here on, start events only
            self.end_of_meta()
            self.start(name, attrs)
        elif name == "annotations" and not self.meta_path:
            self.seen_root = True
        else:
            self.meta_path.append(name)
            self.text_parts.clear()

    def end_meta(self, name: str) -> None:
        if not self.meta_path:
            return
        try:
            self.meta_reader.end(self.meta_path, "".join(self.text_parts))
        except ValueError as exc:
            raise self._error(str(exc)) from exc
        self.meta_path.pop()
        self.text_parts.clear()

    def end_of_meta(self) -> None:
        """Labels and tasks are known: switch to the fast start-events-only handlers."""
        if self.meta_reader is None:
            return
        self.meta, self.meta_reader = self.meta_reader.finish(), None
        self.out.labels = list(dict.fromkeys(self.meta.labels))
        self.out.label_kinds.update(self.meta.not_classes)
        if self.meta.kind == "job" and self.meta.units and self.meta.units[0].job_id is not None:
            self.out.tag = f"job {self.meta.units[0].job_id}"
        self.parser.StartElementHandler = self.start
        self.parser.EndElementHandler = self.parser.CharacterDataHandler = None

    # ---------------------------------------------------------------- phase 2: frames and shapes

    def start(self, name: str, attrs: dict[str, str]) -> None:
        build = _BUILDERS.get(name)
        if build is not None and self.image is not None:
            try:
                self.shape = build(self, attrs)
            except (KeyError, ValueError) as exc:
                raise self._error(f"image {self.image.name!r}: invalid <{name}> ({exc})") from exc
        elif name == "image":
            self.close_image()
            self._open_image(attrs)
        elif name == "track":
            self.close_image()
            self._open_track(attrs)
        elif name == "attribute" and self.shape is not None:
            self.attribute = attrs.get("name", "")
            self.text_parts.clear()
            self.parser.CharacterDataHandler = self.text_parts.append
            self.parser.EndElementHandler = self._end_attribute
        elif name in SKIPPED_SHAPES and self.image is not None:
            self.out.skip(name, attrs.get("label"))
            self.shape = None
            if name == "skeleton":  # its <points> elements are parts of the skeleton
                self._enter_skeleton()

    def _end_attribute(self, name: str) -> None:
        self.shape.attributes[self.attribute] = "".join(self.text_parts)
        self.parser.CharacterDataHandler = None
        self.parser.EndElementHandler = self.end_default

    def _enter_skeleton(self) -> None:
        self.skeleton_depth = 1
        self.parser.StartElementHandler = self._start_in_skeleton
        self.parser.EndElementHandler = self._end_in_skeleton

    def _start_in_skeleton(self, name: str, attrs: dict[str, str]) -> None:
        self.skeleton_depth += 1

    def _end_in_skeleton(self, name: str) -> None:
        self.skeleton_depth -= 1
        if not self.skeleton_depth:
            self.parser.StartElementHandler = self.start_default
            self.parser.EndElementHandler = self.end_default

    def _open_image(self, attrs: dict[str, str]) -> None:
        name = attrs.get("name", "")
        try:
            width, height = int(attrs["width"]), int(attrs["height"])
            frame, task_id = _optional_int(attrs, "id"), _optional_int(attrs, "task_id")
        except (KeyError, ValueError) as exc:
            raise self._error(f"<image name={name!r}> needs whole numbers id, width, height ({exc})") from exc
        if problem := name_problem(name):
            raise self._error(f"<image id={attrs.get('id')!r}> name {name!r} {problem}")
        if width <= 0 or height <= 0:
            raise self._error(f"image {name!r} has size {width}x{height}")
        unit = self.meta.unit(task_id)
        video = unit.video or (not unit.mode and _FRAME_NAME.fullmatch(name))
        if video and not os.path.splitext(name)[1]:
            name += VIDEO_FRAME_EXT  # the file CVAT wrote for the frame
        self._set_image(ImageRecord(
            subset=attrs.get("subset") or unit.subset or "default", name=name, width=width,
            height=height, path=None, task_id=task_id if task_id is not None else unit.task_id, frame=frame,
        ))  # fmt: skip

    def _set_image(self, image: ImageRecord | None) -> None:
        self.image, self.shape = image, None
        if image is not None:
            self.width, self.height = image.width, image.height

    def close_image(self) -> None:
        image = self.image
        if image is None or self.track is not None:
            return
        if any(s.group for s in image.shapes):
            image.shapes = merge_groups(image.shapes, image.width, image.height, self.out)
        self.out.images.append(image)
        self._set_image(None)

    # ---------------------------------------------------------------- tracks (CVAT for video)

    def _open_track(self, attrs: dict[str, str]) -> None:
        self.out.format = VIDEO_FORMAT
        self.track = attrs
        self.start_default, self.end_default = self._start_in_track, self._end_in_track
        self.parser.StartElementHandler, self.parser.EndElementHandler = self.start_default, self.end_default

    def _start_in_track(self, name: str, attrs: dict[str, str]) -> None:
        """A shape of the track on one frame: an object there unless the track is outside."""
        if "frame" not in attrs:  # an <attribute>, or anything CVAT does not write
            self.start(name, attrs)
            return
        self._set_image(self._frame_image(attrs["frame"]))
        if attrs.get("outside") == "1":
            if name == "skeleton":
                self._enter_skeleton()
            return
        shape_attrs = {**attrs, "label": self.track.get("label", "")}
        if group := self.track.get("group_id"):
            shape_attrs["group_id"] = group
        self.start(name, shape_attrs)

    def _end_in_track(self, name: str) -> None:
        if name == "track":
            self.track = None
            self._set_image(None)
            self.start_default, self.end_default = self.start, None
            self.parser.StartElementHandler, self.parser.EndElementHandler = self.start, None

    def _frame_image(self, frame_text: str) -> ImageRecord:
        """The record of a frame of the open track's task, created when first seen."""
        try:
            frame, task_id = int(frame_text), _optional_int(self.track, "task_id")
        except ValueError as exc:
            track = self.track.get("id")
            raise self._error(f"<track id={track!r}>: frame or task_id is not a whole number") from exc
        unit = self.meta.unit(task_id)
        key = (unit.task_id, frame)
        if key not in self.frames:
            self.frames[key] = self._new_frame(unit, frame, self.track.get("subset"))
        return self.frames[key]

    def _new_frame(self, unit: Unit, frame: int, subset: str | None = None) -> ImageRecord:
        if not (unit.width > 0 and unit.height > 0):
            what = f"task {unit.task_id}" if unit.task_id is not None else "the export"
            raise self._error(
                f"{what} has no <original_size> (an image task): 'CVAT for video 1.1' holds no image "
                "names or sizes for its frames; export it as 'CVAT for images 1.1' instead"
            )
        name = f"frame_{frame:06d}{VIDEO_FRAME_EXT}"
        return ImageRecord(subset or unit.subset or "default", name, unit.width, unit.height, None,
                           task_id=unit.task_id, frame=frame)  # fmt: skip

    def close(self) -> None:
        """End of the document: the last image, or every frame of a video-format export."""
        self.end_of_meta()
        self.close_image()
        if self.out.format != VIDEO_FORMAT and not self._video_without_frames():
            return
        self.out.format = VIDEO_FORMAT
        on_disk = _frame_files(self.out.root / "images")
        for unit in self.meta.units:
            for frame in unit.frames() if unit.width > 0 and unit.height > 0 else ():
                key = (unit.task_id, frame)
                if key not in self.frames and (on_disk is None or _has_file(on_disk, unit, frame)):
                    self.frames[key] = self._new_frame(unit, frame)
        order = {unit.task_id: i for i, unit in enumerate(self.meta.units)}
        for _, image in sorted(self.frames.items(), key=lambda item: (order.get(item[0][0], -1), item[0][1])):
            if any(s.group for s in image.shapes):
                image.shapes = merge_groups(image.shapes, image.width, image.height, self.out)
            self.out.images.append(image)

    def _video_without_frames(self) -> bool:
        """A video-format export without any track: still lists its (empty) frames."""
        return not self.out.images and any(u.video and u.width > 0 for u in self.meta.units)

    # ---------------------------------------------------------------- shapes

    def add(self, shape: Shape | None, attrs: dict[str, str]) -> Shape | None:
        """Common shape attributes, clipping, then the shape joins the open image.

        Parts of a group are kept as CVAT's exporter sees them (unclipped) until the group is
        merged (:mod:`trainer.data.readers.groups`).
        """
        if shape is None:
            self.out.skip(DEGENERATE, attrs.get("label"))
            return None
        if attrs.get("occluded") == "1":
            shape.occluded = True
        group = attrs.get("group_id")
        if group and group != "0":
            shape.group = int(group)
            self.image.shapes.append(shape)
            return shape
        x0, y0, x1, y1 = shape.box
        inside = x0 >= 0 and y0 >= 0 and x1 <= self.width and y1 <= self.height
        if not (inside and x1 - x0 >= 1 and y1 - y0 >= 1):  # the rare case: clip or drop
            shape = finish(shape, self.width, self.height, self.out)
        if shape is not None:
            self.image.shapes.append(shape)
        return shape

    def _error(self, message: str) -> UserError:
        return UserError(f"{self.xml_path}, line {self.parser.CurrentLineNumber}: {message}")


def _optional_int(attrs: dict[str, str], key: str) -> int | None:
    text = attrs.get(key)
    return int(text) if text else None


def _frame_files(folder: Path) -> set[str] | None:
    """Lower-cased paths of the files under ``folder`` (None when the export has no images)."""
    if not folder.is_dir():
        return None
    return {
        os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/").lower()
        for root, _, files in os.walk(folder)
        for f in files
    }


def _has_file(files: set[str], unit: Unit, frame: int) -> bool:
    """Whether the frame's file is in the export (a frame deleted in CVAT has none)."""
    name = f"frame_{frame:06d}{VIDEO_FRAME_EXT}".lower()
    return name in files or f"{unit.subset or 'default'}/{name}".lower() in files


def _box(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    x0, y0 = float(attrs["xtl"]), float(attrs["ytl"])
    x1, y1 = float(attrs["xbr"]), float(attrs["ybr"])
    label = _label(attrs)
    # The common case, kept short (it runs once per box): upright, ungrouped, not occluded, inside
    # (CVAT writes rotation and group_id only when they are not 0).
    if (
        "rotation" not in attrs
        and "group_id" not in attrs
        and attrs.get("occluded") != "1"
        and 0 <= x0 <= x1 - 1 <= h.width - 1
        and 0 <= y0 <= y1 - 1 <= h.height - 1
    ):
        shape = Shape(label, "rectangle", (x0, y0, x1, y1))
        h.image.shapes.append(shape)
        return shape
    rotation = float(attrs.get("rotation") or 0.0)
    group = attrs.get("group_id")
    if group and group != "0":  # upright with its rotation, as CVAT's COCO exporter sees it
        return h.add(Shape(label, "rectangle", (x0, y0, x1, y1), rotation), attrs)
    if rotation % 360:
        h.out.notes[ROTATED] += 1
        return h.add(rotated_box(x0, y0, x1, y1, rotation, label=label), attrs)
    return h.add(Shape(label, "rectangle", (x0, y0, x1, y1)), attrs)


def _label(attrs: dict[str, str]) -> str:
    label = attrs["label"]
    if not label:
        raise ValueError("it has no label")
    return label


def _polygon(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    flat = [float(v) for pair in attrs["points"].split(";") for v in pair.split(",")]
    if len(flat) < 6 or len(flat) % 2 or not all(map(math.isfinite, flat)):
        raise ValueError(f"a polygon needs at least 3 finite x,y points, got {attrs['points']!r:.80}")
    return h.add(Shape(_label(attrs), "polygon", points_box(flat), polygons=[flat]), attrs)


def _mask(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    left, top = int(float(attrs["left"])), int(float(attrs["top"]))
    width, height = int(float(attrs["width"])), int(float(attrs["height"]))
    bitmap = decode_cvat_rle(parse_cvat_rle(attrs["rle"]), width, height)
    return h.add(bitmap_shape(bitmap, left, top, label=_label(attrs)), attrs)


def _ellipse(h: _Handler, attrs: dict[str, str]) -> Shape | None:
    cx, cy = float(attrs["cx"]), float(attrs["cy"])
    rx, ry = float(attrs["rx"]), float(attrs["ry"])
    rotation = float(attrs.get("rotation") or 0.0)
    group = attrs.get("group_id")
    if group and group != "0":  # CVAT's COCO export turns it into a mask before grouping
        return h.add(ellipse_bitmap(cx, cy, rx, ry, rotation, h.width, h.height, label=_label(attrs)), attrs)
    box = ellipse_box(cx, cy, rx, ry, rotation)
    ring = ellipse_polygon(cx, cy, rx, ry, rotation)
    return h.add(Shape(_label(attrs), "ellipse", box, rotation, polygons=[ring]), attrs)


_BUILDERS = {"box": _box, "polygon": _polygon, "mask": _mask, "ellipse": _ellipse}
