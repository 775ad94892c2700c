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
UNVALIDATED = "unvalidated pre-annotation (label suffix {suffix})"
UNFINISHED = "image still holding unvalidated pre-annotations"


@dataclass
class ParsedExport:
    """One source's labels (export order) and images; paths are resolved later."""

    source: str  # as the user named it
    root: Path  # folder the export's files are in
    format: str  # "CVAT for images 1.1" or "COCO 1.0"
    labels: list[str] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


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
