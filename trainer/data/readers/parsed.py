"""What one export yields before sources are merged, and the reasons readers count."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.records import ImageRecord

# Reasons shapes or images are skipped (DetectionData.skipped) or changed (DetectionData.notes).
DEGENERATE = "degenerate shape (< 1 px inside the image)"
UNANNOTATED = "unannotated image"
UNSELECTED = "image without selected labels"
NOT_SELECTED = "object of an unselected label"
MISSING = "missing image"
ROTATED = "rotated box (trained on its envelope)"
CLIPPED = "shape clipped to the image"
GROUPED = "grouped shapes merged into one object"
NO_IMAGES = "image not in the export (annotations only)"
# Why a label of an export is no model class (DetectionData.not_classes).
TAG_LABEL = "tag label (whole-image tags, no objects)"
SKELETON_LABEL = "skeleton label (keypoints, no boxes)"
NO_OBJECTS = "no objects in the data"


def skeleton_point(parent: str) -> str:
    return f"point of skeleton {parent!r} (keypoints, no boxes)"


def all_skipped(kinds: Counter) -> str:
    listed = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    return f"every shape skipped ({listed})"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an image's path inside an export, or None when it can."""
    posix = name.replace("\\", "/")
    if not name.strip():
        return "is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "holds control characters"
    if posix.startswith("/") or ".." in posix.split("/") or posix.endswith("/"):
        return "points outside the export's image folder"
    return None


@dataclass
class ParsedExport:
    """One source's labels (export order) and images; paths are resolved later."""

    source: str  # as the user named it
    root: Path  # folder the export's files are in
    format: str  # "CVAT for images 1.1", "CVAT for video 1.1" or "COCO 1.0"
    labels: list[str] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    #: Labels that can hold no object whatever is drawn (tag, skeleton, skeleton point) -> why.
    label_kinds: dict[str, str] = field(default_factory=dict)
    #: Per label, the reasons its shapes were skipped (a label with nothing else is no class).
    label_skips: dict[str, Counter] = field(default_factory=dict)
    #: What tells this export's images from same-named ones of other sources when they carry no
    #: task id: "job 12" for a job export, else the file's stem.
    tag: str = ""

    def skip(self, reason: str, label: str | None = None) -> None:
        """Count a shape left out, under its label too."""
        self.skipped[reason] += 1
        if label is not None:
            self.label_skips.setdefault(label, Counter())[reason] += 1


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cycle collector while the readers create their (acyclic) records in bulk.

    Every automatic collection would rescan all objects the process holds (torch alone brings
    hundreds of thousands) and find no garbage: with 100 000 boxes, a third of the load time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
