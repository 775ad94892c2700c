"""Which labels are classes, and label selection and renaming by name, the same for every source.

A label is a model class only when it holds at least one object. Every CVAT export lists tag
labels, skeleton labels and their points beside the others (and COCO cannot tell a tag label from
an unused one), so those, and labels whose every shape was skipped, never reach the model, its
bundle or the function's spec; ``inspect`` lists them with the reason.
"""

from __future__ import annotations

from collections import Counter

from serverless.errors import UserError
from trainer.data.readers.parsed import (
    NO_OBJECTS,
    NOT_SELECTED,
    UNANNOTATED,
    UNSELECTED,
    ParsedExport,
    all_skipped,
)
from trainer.data.records import ImageRecord


def label_classes(exports: list[ParsedExport]) -> tuple[list[str], dict[str, str]]:
    """(labels holding objects in first-seen order, every other label -> why it is no class)."""
    counts = Counter(s.label for e in exports for im in e.images for s in im.shapes)
    known: dict[str, None] = {}
    kinds: dict[str, str] = {}
    skips: dict[str, Counter] = {}
    for export in exports:
        known.update(dict.fromkeys(export.labels))
        known.update(dict.fromkeys(s.label for im in export.images for s in im.shapes))
        known.update(dict.fromkeys(export.label_kinds))
        for name, reason in export.label_kinds.items():
            kinds.setdefault(name, reason)
        for name, reasons in export.label_skips.items():
            skips.setdefault(name, Counter()).update(reasons)
    classes = [n for n in known if counts[n]]
    others = {n: kinds.get(n) or (all_skipped(skips[n]) if n in skips else NO_OBJECTS)
              for n in known if not counts[n]}  # fmt: skip
    return classes, others


def label_mapping(
    known: list[str],
    keep: list[str] | None,
    merge: dict[str, list[str]] | None,
    not_classes: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str | None]]:
    """(final label order, old name -> new name or None when dropped).

    ``merge`` {"NEW": ["A", "B"]} renames A and B to NEW (NEW takes the place of the first of
    them); ``keep`` then selects by the new names. Order otherwise follows ``known`` (the
    classes); naming a label of ``not_classes`` is an error that says why it is none.
    """
    rename: dict[str, str] = {}
    for new, olds in (merge or {}).items():
        for old in olds:
            _check_class(old, f"--merge-label {new}", known, not_classes)
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
        for name in keep:
            _check_class(name, "--labels", order, not_classes)
        unknown = [n for n in keep if n not in order]
        if unknown or not keep:
            raise UserError(
                f"--labels: unknown label(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"known labels: {', '.join(order)}"
            )
        order = [n for n in order if n in keep]
    mapping = {n: rename.get(n, n) if rename.get(n, n) in order else None for n in known}
    return order, mapping


def _check_class(name: str, option: str, classes: list[str], not_classes: dict[str, str] | None) -> None:
    if name not in classes and name in (not_classes or {}):
        raise UserError(
            f"{option}: label {name!r} is no class a detector can learn: {not_classes[name]}; "
            f"labels with objects: {', '.join(classes) or 'none'}"
        )


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
