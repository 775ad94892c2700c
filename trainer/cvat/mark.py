"""Mark frames in CVAT tasks as "annotate next": a tag of the tag label ``annotate-next``.

Why a tag: it is what community CVAT offers for saying something about a whole frame. It needs no
copy of the images (a new task would duplicate frames, and train on them twice once annotated),
it shows in the annotation view's tag bar, the annotation filter finds it (``Label ==
annotate-next``) so the arrow keys jump from one marked frame to the next, and it survives in
exports as a record of what was suggested. The readers skip tags, so training is unaffected, and
``predict --server`` / ``suggest`` do not count these tags as annotations (the frame stays
eligible). The label is created (type ``tag``) in the task, or in its project, when missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cvat_sdk import models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction

from trainer.cvat.upload import SUGGEST_TAG, add_labels


@dataclass
class MarkReport:
    """What one task got (or would get)."""

    task_id: int
    marked: list[int] = field(default_factory=list)  # frames tagged now
    already: list[int] = field(default_factory=list)  # frames that carried the tag before
    created_label: bool = False


def mark_frames(
    client: Any, tasks: dict[int, Any], frames: Iterable[tuple[int, int]], dry_run: bool = False
) -> list[MarkReport]:
    """Tag each (task id, frame) with :data:`SUGGEST_TAG`; frames tagged before are left alone."""
    wanted: dict[int, list[int]] = defaultdict(list)
    for task_id, frame in frames:
        wanted[task_id].append(frame)
    reports = []
    for task_id, chosen in wanted.items():
        task = tasks[task_id]
        report = MarkReport(task_id)
        label_id = _tag_label(client, task, dry_run, report)
        tagged = set()
        if label_id is not None:
            tagged = {t.frame for t in task.get_annotations().tags if t.label_id == label_id}
        report.already = sorted(f for f in chosen if f in tagged)
        report.marked = sorted(f for f in chosen if f not in tagged)
        if report.marked and not dry_run:
            tags = [models.LabeledImageRequest(frame=f, label_id=label_id, source="auto")
                    for f in report.marked]  # fmt: skip
            task.update_annotations(
                models.PatchedLabeledDataRequest(tags=tags), action=AnnotationUpdateAction.CREATE
            )
        reports.append(report)
    return reports


def _tag_label(client: Any, task: Any, dry_run: bool, report: MarkReport) -> int | None:
    """The id of the task's ``annotate-next`` tag label, created when missing (None in a dry run
    that would create it)."""
    found = [label for label in task.get_labels() if label.name == SUGGEST_TAG]
    if found:
        return found[0].id
    report.created_label = True
    if dry_run:
        return None
    add_labels(client, task, [models.PatchedLabelRequest(name=SUGGEST_TAG, type="tag")])
    return next(label.id for label in task.get_labels() if label.name == SUGGEST_TAG)


def mark_lines(reports: list[MarkReport], dry_run: bool) -> list[str]:
    verb = "would tag" if dry_run else "tagged"
    lines = []
    for r in reports:
        line = f"task {r.task_id}: {verb} {len(r.marked)} frame(s) {SUGGEST_TAG!r}"
        if r.marked:
            line += f" ({', '.join(map(str, r.marked))})"
        if r.already:
            line += f"; {len(r.already)} already tagged"
        if r.created_label:
            line += f"; {'would create' if dry_run else 'created'} tag label {SUGGEST_TAG!r}"
        lines.append(line)
    return lines
