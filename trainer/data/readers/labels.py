"""Label selection and renaming, by name, applied the same way to every source.

Pre-annotations that ``predict --nv`` wrote (labels ending in a suffix, "_NV") are model output
nobody validated yet. By default they are left out, and so is every image still holding one: its
validation is unfinished, and training on its other objects alone would teach that the objects
under the pre-annotations are background. Included, they count as their label without the suffix.
"""

from __future__ import annotations

from serverless.errors import UserError
from trainer.data.readers.parsed import (
    NOT_SELECTED,
    UNANNOTATED,
    UNFINISHED,
    UNSELECTED,
    UNVALIDATED,
    ParsedExport,
)
from trainer.data.records import ImageRecord


def label_mapping(
    known: list[str], keep: list[str] | None, merge: dict[str, list[str]] | None
) -> tuple[list[str], dict[str, str | None]]:
    """(final label order, old name -> new name or None when dropped).

    ``merge`` {"NEW": ["A", "B"]} renames A and B to NEW (NEW takes the place of the first of
    them); ``keep`` then selects by the new names. Order otherwise follows ``known``.
    """
    rename: dict[str, str] = {}
    for new, olds in (merge or {}).items():
        for old in olds:
            if old not in known:
                raise UserError(
                    f"merge {new}={','.join(olds)}: unknown label {old!r}; "
                    f"known labels: {', '.join(known)}"
                )
            if rename.get(old, new) != new:
                raise UserError(f"label {old!r} is merged into both {rename[old]!r} and {new!r}")
            rename[old] = new
    order = list(dict.fromkeys(rename.get(n, n) for n in known))
    if keep is not None:
        unknown = [n for n in keep if n not in order]
        if unknown or not keep:
            raise UserError(
                f"--labels: unknown label(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"known labels: {', '.join(order)}"
            )
        order = [n for n in order if n in keep]
    mapping = {n: rename.get(n, n) if rename.get(n, n) in order else None for n in known}
    return order, mapping


def select(export: ParsedExport, mapping: dict[str, str | None], keep_empty: bool) -> list:
    """Images of ``export`` with shapes relabelled; images left without objects are dropped
    (counted) unless ``keep_empty``."""
    kept: list[ImageRecord] = []
    identity = all(old == new for old, new in mapping.items())
    for im in export.images:
        had_shapes = bool(im.shapes)
        if not identity:
            im.shapes = _relabel(im.shapes, mapping, export)
        if im.shapes or keep_empty:
            kept.append(im)
        else:
            export.skipped[UNSELECTED if had_shapes else UNANNOTATED] += 1
    return kept


def _relabel(shapes: list, mapping: dict[str, str | None], export: ParsedExport) -> list:
    kept = []
    for shape in shapes:
        new = mapping[shape.label]
        if new is None:
            export.skipped[NOT_SELECTED] += 1
        else:
            shape.label = new
            kept.append(shape)
    return kept


def drop_unvalidated(export: ParsedExport, suffix: str) -> None:
    """Leave out shapes whose label ends in ``suffix``, the images holding them and the labels."""
    kept: list[ImageRecord] = []
    for im in export.images:
        unvalidated = sum(1 for s in im.shapes if s.label.endswith(suffix))
        if unvalidated:
            export.skipped[UNVALIDATED.format(suffix=suffix)] += unvalidated
            export.skipped[UNFINISHED] += 1
        else:
            kept.append(im)
    export.images = kept
    export.labels = [name for name in export.labels if not name.endswith(suffix)]


def merge_unvalidated(
    known: list[str], merge: dict[str, list[str]] | None, suffix: str
) -> dict[str, list[str]]:
    """``merge`` extended so that every "X<suffix>" label counts as X (or as what X merges into)."""
    merged = {new: list(olds) for new, olds in (merge or {}).items()}
    for name in known:
        if name.endswith(suffix) and len(name) > len(suffix):
            base = name[: -len(suffix)]
            target = next((new for new, olds in merged.items() if base in olds), base)
            merged.setdefault(target, []).append(name)
    return merged


def unvalidated_note(skipped: dict[str, int], suffix: str) -> str | None:
    """One line saying how many unvalidated pre-annotations were left out, or None."""
    shapes, images = skipped.get(UNVALIDATED.format(suffix=suffix), 0), skipped.get(UNFINISHED, 0)
    if not shapes:
        return None
    return (f"left out {shapes} unvalidated pre-annotation(s) (labels ending in {suffix}) and the "
            f"{images} image(s) holding them; --include-unvalidated uses them")
