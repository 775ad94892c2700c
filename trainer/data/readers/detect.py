"""Which export format a folder or file holds, decided by its files, never by its name."""

from __future__ import annotations

from pathlib import Path

from serverless.errors import UserError
from trainer.data.readers import coco, cvat_xml

EXPECTED = (
    "expected a CVAT export: annotations.xml ('CVAT for images 1.1') or "
    "annotations/instances_<subset>.json ('COCO 1.0'), as a zip or an unpacked folder"
)


def detect(path: Path, source: str) -> tuple[str, list[Path], Path]:
    """(format, annotation files, export root) of the export at ``path`` (folder or file)."""
    if path.is_file():
        return _detect_file(path, source)
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # A re-zipped export often wraps everything in one extra folder.
    candidates = [path, *subdirs] if len(subdirs) == 1 else [path]
    for root in candidates:
        if (root / "annotations.xml").is_file():
            return cvat_xml.FORMAT, [root / "annotations.xml"], root
        found = sorted((root / "annotations").glob("instances_*.json"))
        if found:
            return coco.FORMAT, found, root
    raise UserError(f"{source}: found {_listing(path)}; {EXPECTED}")


def _detect_file(path: Path, source: str) -> tuple[str, list[Path], Path]:
    if path.suffix.lower() == ".xml":
        return cvat_xml.FORMAT, [path], path.parent
    if path.suffix.lower() == ".json":
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        return coco.FORMAT, [path], root
    raise UserError(f"{source}: is a {path.suffix or 'extensionless'} file; {EXPECTED}")


def _listing(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:8])
    return shown + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
