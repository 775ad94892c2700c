"""The in-memory dataset every reader produces and every consumer (training, crops, inspect) reads.

Plain dataclasses, independent of the export format: a CVAT XML and a COCO export of the same project
yield equal records. Images are named by their :attr:`ImageRecord.identity` (source, subset, name),
never by numeric ids, which CVAT reuses across subsets and renumbers in COCO.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class Shape:
    """One annotated object. ``box`` is always set: axis-aligned xyxy in pixels, clipped to the image."""

    label: str
    kind: str  # "rectangle", "polygon", "mask" or "ellipse" (as CVAT names them)
    box: tuple[float, float, float, float]
    rotation: float = 0.0  # degrees, for rotated rectangles/ellipses (box is then the envelope)
    polygons: list[list[float]] | None = None  # flat [x0, y0, x1, y1, ...] rings (polygon, ellipse)
    mask: np.ndarray | None = None  # bool bitmap of the box crop, for masks
    mask_origin: tuple[int, int] = (0, 0)  # (left, top) of ``mask`` in image pixels
    occluded: bool = False
    attributes: dict[str, str] = field(default_factory=dict)
    object_id: int | None = None  # CVAT/COCO annotation id where the export has one
    group: int = 0

    def to_mask(self, width: int, height: int) -> np.ndarray:
        """Full-image bool mask: the bitmap, the polygons, or the box when the shape has no outline."""
        out = np.zeros((height, width), dtype=bool)
        if self.mask is not None:
            left, top = self.mask_origin
            h, w = self.mask.shape
            x0, y0 = max(left, 0), max(top, 0)
            x1, y1 = min(left + w, width), min(top + h, height)
            if x1 > x0 and y1 > y0:
                out[y0:y1, x0:x1] = self.mask[y0 - top : y1 - top, x0 - left : x1 - left]
            return out
        canvas = Image.new("1", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        if self.polygons:
            for ring in self.polygons:
                if len(ring) >= 6:
                    draw.polygon(ring, fill=1)
        else:
            draw.rectangle(self.box, fill=1)
        return np.asarray(canvas, dtype=bool)


@dataclass
class ImageRecord:
    """One image of an export with its shapes."""

    subset: str
    name: str  # path relative to the export's image root, as CVAT writes it
    width: int
    height: int
    path: Path | None  # where the file is on disk (None when images were not exported)
    shapes: list[Shape] = field(default_factory=list)
    task_id: int | None = None
    frame: int | None = None
    #: Tells apart same-named images of different sources (e.g. "task 15"); empty when the
    #: subset and name alone are unique.
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.subset, self.name)

    @property
    def identity(self) -> str:
        """The image's name across exports and runs (split roles, recorded validation sets):
        ``subset/name``, prefixed by ``source:`` when that is needed to tell images apart.

        The extension is lower-cased: CVAT's XML keeps a file's own case (``IMG_1.JPG``,
        ``frame_000000.PNG``) while its COCO export lower-cases it (since 2.32), and both name
        one image.
        """
        name = canonical_name(self.name)
        return f"{self.source}:{self.subset}/{name}" if self.source else f"{self.subset}/{name}"


def canonical_name(name: str) -> str:
    """``name`` with its extension lower-cased, the same in every export format."""
    suffix = PurePosixPath(name).suffix
    return name[: len(name) - len(suffix)] + suffix.lower() if suffix else name


@dataclass
class DetectionData:
    """Everything read from one or more exports, merged under one label list."""

    labels: list[str]  # class order: class id = index + 1; only labels that hold objects
    images: list[ImageRecord]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    sources: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # kept but changed (e.g. rotated -> envelope)
    #: Labels of the exports that are no model class (tag, skeleton, no objects) -> why not.
    not_classes: dict[str, str] = field(default_factory=dict)
    #: The pixel limit the images were checked against, which decoders of these images apply too;
    #: None: the process default (:func:`serverless.imageio.pixel_limit`).
    max_pixels: int | None = None

    def subset(self, name: str) -> list[ImageRecord]:
        return [im for im in self.images if im.subset.lower() == name.lower()]

    def summary(self) -> dict:
        """Counts users check before training (also saved into the bundle's provenance)."""
        per_label = Counter(s.label for im in self.images for s in im.shapes)
        return {
            "images": len(self.images),
            "images_with_objects": sum(1 for im in self.images if im.shapes),
            "objects": sum(per_label.values()),
            "labels": list(self.labels),
            "objects_per_label": {name: per_label.get(name, 0) for name in self.labels},
            "subsets": dict(Counter(im.subset for im in self.images)),
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "not_classes": dict(self.not_classes),
            "sources": list(self.sources),
        }
