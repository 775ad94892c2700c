"""Upload a bundle's detections into CVAT tasks through cvat-sdk: the pre-annotation loop.

By default only frames nobody has annotated get detections: a frame with any shape, tag or track on
it is human work and is left alone. Existing annotations are never deleted. A label suffix ("_NV",
not validated) keeps predictions apart from validated labels until a person confirms them. Shapes
are written in batches of frames, so an interrupted run keeps what it sent and a rerun carries on
with the frames still empty. Each shape carries its score as the attribute named ``score`` (by
default) when its task label has one: written by the attribute's own id, in the form its type
takes (number: percent, otherwise a decimal) and only when cvat-sdk's validator of that attribute
accepts the value; a label without it gets the shape alone. Tags of the label ``annotate-next``
(what ``suggest --mark`` writes) do not make a frame annotated. Every cvat-sdk call of the upload
lives in this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from cvat_sdk import models
from cvat_sdk.api_client.exceptions import ForbiddenException, NotFoundException
from cvat_sdk.attributes import attribute_value_validator
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from tqdm import tqdm

from serverless.detector import Detector
from serverless.errors import UserError
from serverless.imageio import decode_image
from serverless.score_attribute import DEFAULT_NAME
from trainer.cvat.sdk_function import ScoreSlot, to_shapes
from trainer.cvat.server import server_errors
from trainer.inference import detect_each


@dataclass
class UploadOptions:
    threshold: float | None = None  # None: the bundle's calibrated thresholds
    label_suffix: str = ""  # appended to each model label to name the task label, e.g. "_NV"
    all_frames: bool = False  # also frames that already have annotations (never deleting them)
    create_labels: bool = False  # add missing target labels to the task (or its project)
    polygons: bool = False  # masks as polygons (mask bundles)
    dry_run: bool = False  # detect and report, send nothing
    batch_frames: int = 50  # frames per request
    score_attribute: str = DEFAULT_NAME  # task label attribute that gets the score ("": none)


@dataclass
class TaskReport:
    """What one task got (or would get, in a dry run)."""

    task_id: int
    name: str
    predicted: int = 0  # frames detected on
    skipped: int = 0  # frames left alone because they already had annotations
    failed: list[str] = field(default_factory=list)  # unreadable frames
    shapes: Counter[str] = field(default_factory=Counter)  # per task label name
    missing: Counter[str] = field(default_factory=Counter)  # detections of labels the task lacks
    created: list[str] = field(default_factory=list)  # labels added (or to be added)
    scores: int = 0  # score attribute values written (or to be written)
    score_notes: list[str] = field(default_factory=list)  # why scores were not written somewhere


#: Tag label whose tags mark frames suggested for annotation (``suggest --mark``); such a tag does
#: not make a frame annotated.
SUGGEST_TAG = "annotate-next"
#: What a user can do after a failed upload.
RERUN = "shapes already sent stay in their tasks; run again to continue with the empty frames"


def upload_errors(url: str) -> AbstractContextManager[None]:
    """:func:`~trainer.cvat.server.server_errors` of an upload, which a rerun continues."""
    return server_errors(url, then=RERUN)


def find_tasks(client: Any, task_ids: Iterable[int] = (), project_id: int | None = None) -> list:
    """The tasks named by id, or every task of a project, as cvat-sdk Task proxies."""
    what = f"project {project_id}"
    try:
        if project_id is not None:
            tasks = client.projects.retrieve(project_id).get_tasks()
            if not tasks:
                raise UserError(f"project {project_id} has no tasks")
            return sorted(tasks, key=lambda t: t.id)
        found = []
        for task_id in task_ids:
            what = f"task {task_id}"
            found.append(client.tasks.retrieve(task_id))
        return found
    except (NotFoundException, ForbiddenException) as exc:
        raise UserError(f"{what} does not exist or you may not access it ({exc.status})") from exc


def upload_predictions(
    client: Any, detector: Detector, tasks: list, options: UploadOptions
) -> Iterator[TaskReport]:
    """Detect on each task's eligible frames and write the shapes (or report them, dry run);
    yields each task's report as soon as the task is done. Every task's labels are checked before
    anything is created or sent, so a refused run leaves every task as it was."""
    for task in tasks:
        check_labels(task, detector.labels, _shape_type(detector, options), options)
    for task in tasks:
        yield upload_task(client, detector, task, options)


def _shape_type(detector: Detector, options: UploadOptions) -> str:
    if detector.has_masks:
        return "polygon" if options.polygons else "mask"
    return "rectangle"


def upload_task(client: Any, detector: Detector, task: Any, options: UploadOptions) -> TaskReport:
    """Detect on one task's eligible frames and send the shapes, ``batch_frames`` at a time."""
    report = TaskReport(task.id, task.name)
    shape_type = _shape_type(detector, options)
    label_ids, id_names = resolve_labels(client, task, detector.labels, shape_type, options, report)
    targets = {name: name + options.label_suffix for name in detector.labels}
    slots = score_slots(task, targets, options.score_attribute, report)
    frames = eligible_frames(task, options.all_frames, report)
    batch: list[models.LabeledShapeRequest] = []
    batch_frames = 0
    detected = detect_each(detector, frames, partial(fetch_frame, task), options.threshold)
    for index, image, detections in tqdm(
        detected, total=len(frames), desc=f"task {task.id}", unit="frame"
    ):
        if detections is None:
            report.failed.append(str(image))
            continue
        shapes = to_shapes(detections, label_ids, polygons=options.polygons, scores=slots)
        report.scores += sum(len(shape.attributes) for shape in shapes)
        report.missing.update(label for label in detections.labels if label not in label_ids)
        for shape in shapes:
            shape.frame, shape.source = index, "auto"
        counts = Counter(id_names[s.label_id] for s in shapes)
        report.shapes.update(counts)
        report.predicted += 1
        if options.dry_run:
            name = f" ({frames[index]})" if frames[index] else ""
            tqdm.write(f"task {task.id} frame {index}{name}: {_counts(counts) or 'nothing'}")
            continue
        batch += shapes
        batch_frames += 1
        if batch_frames == options.batch_frames:
            send_shapes(task, batch)
            batch, batch_frames = [], 0
    send_shapes(task, batch)
    report.score_notes += [
        f"{slot.rejected} score(s) refused by attribute {options.score_attribute!r} of {targets[m]!r}"
        for m, slot in slots.items() if slot.rejected
    ]
    return report


def resolve_labels(
    client: Any,
    task: Any,
    model_labels: list[str],
    shape_type: str,
    options: UploadOptions,
    report: TaskReport,
) -> tuple[dict[str, int], dict[int, str]]:
    """Map model label -> task label id by name (+ suffix); create (after checking them all) or
    refuse missing ones."""
    by_name, targets, absent = check_labels(task, model_labels, shape_type, options)
    if absent and options.create_labels:
        report.created = list(absent.values())
        if not options.dry_run:
            specs = [_new_label(t, by_name.get(m), shape_type) for m, t in absent.items()]
            add_labels(client, task, specs)
            by_name = {label.name: label for label in task.get_labels()}
    label_ids = {m: by_name[t].id for m, t in targets.items() if t in by_name}
    if options.dry_run and options.create_labels:  # labels to be created get unused ids
        unused = max((label.id for label in by_name.values()), default=0) + 1
        label_ids |= {m: unused + i for i, m in enumerate(absent)}
    id_names = {label_ids[m]: targets[m] for m in label_ids}
    return label_ids, id_names


def score_slots(
    task: Any, targets: dict[str, str], name: str, report: TaskReport
) -> dict[str, ScoreSlot]:
    """Model label -> where its scores go: the task label's attribute ``name``, when it has one
    that can hold a score. A number attribute takes percent ("87"), any other a decimal ("0.873");
    an attribute whose values cvat-sdk cannot validate is reported and left alone."""
    if not name:
        return {}
    by_name = {label.name: label for label in task.get_labels()}
    slots = {}
    for model_label, target in targets.items():
        label = by_name.get(target)
        attribute = next((a for a in label.attributes if a.name == name), None) if label else None
        if attribute is None:
            continue
        try:
            accepts = attribute_value_validator(attribute)
        except ValueError as exc:  # e.g. a number attribute with a fractional step
            report.score_notes.append(f"attribute {name!r} of {target!r} cannot hold scores: {exc}")
            continue
        fmt = "percent" if attribute.input_type.value == "number" else "decimal"
        slots[model_label] = ScoreSlot(attribute.id, fmt, accepts)
    if not slots and not report.score_notes:
        report.score_notes.append(
            f"no task label has an attribute {name!r}; add one (text, or number 0-100 step 1) "
            "to keep the scores"
        )
    return slots


def check_labels(
    task: Any, model_labels: list[str], shape_type: str, options: UploadOptions
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(task labels by name, model label -> target name, absent targets); a UserError when an
    existing target cannot hold the model's shapes, or a suffixed one is missing without
    ``create_labels``. Changes nothing."""
    by_name = {label.name: label for label in task.get_labels()}
    targets = {name: name + options.label_suffix for name in model_labels}
    for model_label, target in targets.items():
        label = by_name.get(target)
        if label is not None and label.type not in ("any", shape_type):
            raise UserError(
                f"task {task.id}: label {target!r} is of type {label.type!r}, but this model "
                f"writes {shape_type!r} shapes (model label {model_label!r}); nothing was changed"
            )
    absent = {m: t for m, t in targets.items() if t not in by_name}
    if absent and options.label_suffix and not options.create_labels:
        raise UserError(
            f"task {task.id} ({task.name!r}) has no label(s) "
            f"{', '.join(map(repr, absent.values()))}; add them in CVAT or pass --create-labels"
        )
    return by_name, targets, absent


def _new_label(name: str, base: Any, shape_type: str) -> models.PatchedLabelRequest:
    """A label like its validated counterpart (same type) if that takes the model's shapes, else
    of the type the model writes."""
    usable = base is not None and base.type in ("any", shape_type)
    return models.PatchedLabelRequest(name=name, type=base.type if usable else shape_type)


def add_labels(client: Any, task: Any, specs: list[models.PatchedLabelRequest]) -> None:
    """Add labels where the task's labels live: its project's when it has one."""
    if task.project_id:
        client.projects.retrieve(task.project_id).update(
            models.PatchedProjectWriteRequest(labels=specs)
        )
    else:
        task.update(models.PatchedTaskWriteRequest(labels=specs))


def eligible_frames(task: Any, all_frames: bool, report: TaskReport) -> dict[int, str]:
    """Frames to predict on (number -> file name, "" for video frames): not deleted and,
    unless ``all_frames``, not annotated."""
    meta = task.get_meta()
    deleted = set(meta.deleted_frames)
    per_image = len(meta.frames) == meta.size
    live = {
        i: meta.frames[i].name if per_image else "" for i in range(meta.size) if i not in deleted
    }
    if all_frames:
        return live
    pointers = {label.id for label in task.get_labels() if label.name == SUGGEST_TAG}
    annotated = annotated_frames(task.get_annotations(), meta.size, ignore_tags=pointers)
    frames = {i: name for i, name in live.items() if i not in annotated}
    report.skipped = len(live) - len(frames)
    return frames


def annotated_frames(annotations: Any, size: int, ignore_tags: set[int] = frozenset()) -> set[int]:
    """Frames carrying any tag (except of the labels ``ignore_tags``), shape, or track position
    (tracks cover frames until 'outside')."""
    frames = {tag.frame for tag in annotations.tags if not ignore_tags or tag.label_id not in ignore_tags}
    frames |= {shape.frame for shape in annotations.shapes}
    for track in annotations.tracks:
        keyframes = sorted(track.shapes, key=lambda s: s.frame)
        for key, following in zip(keyframes, [*keyframes[1:], None], strict=True):
            if not key.outside:
                frames.update(range(key.frame, following.frame if following else size))
    return frames


def task_frames(
    client: Any, task_ids: Iterable[int], project_id: int | None, all_frames: bool
) -> tuple[dict[int, Any], list[tuple[int, int, str]]]:
    """(tasks by id, their eligible frames as (task id, frame number, file name)), for the commands
    that read every frame of some tasks (count, suggest)."""
    tasks = {t.id: t for t in find_tasks(client, task_ids, project_id)}
    items = []
    for task in tasks.values():
        frames = eligible_frames(task, all_frames, TaskReport(task.id, task.name))
        items += [(task.id, index, name) for index, name in frames.items()]
    return tasks, items


def fetch_frame(task: Any, index: int) -> np.ndarray:
    """The original frame file, decoded as the function decodes it."""
    data = task.get_frame(index, quality="original").read()
    return decode_image(data, source=f"task {task.id} frame {index}")


def send_shapes(task: Any, shapes: list[models.LabeledShapeRequest]) -> None:
    """Add shapes to the task; existing annotations stay as they are."""
    if shapes:
        task.update_annotations(
            models.PatchedLabeledDataRequest(shapes=shapes), action=AnnotationUpdateAction.CREATE
        )


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


def report_lines(report: TaskReport, dry_run: bool) -> list[str]:
    """The per-task summary the command prints."""
    verb = "would write" if dry_run else "wrote"
    lines = [
        f"task {report.task_id} ({report.name}): {report.predicted} frame(s) predicted, "
        f"{report.skipped} already annotated (left alone); {verb} "
        f"{sum(report.shapes.values())} shape(s): {_counts(report.shapes) or '-'}"
    ]
    if report.created:
        created = ", ".join(report.created)
        lines.append(f"  {'would create' if dry_run else 'created'} label(s): {created}")
    if report.missing:
        lines.append(
            f"  model labels missing from task {report.task_id}, not uploaded: "
            f"{_counts(report.missing)} detection(s)"
        )
    if report.scores:
        lines.append(f"  scores {'would be ' if dry_run else ''}kept in {report.scores} shape(s)")
    lines += [f"  scores: {note}" for note in report.score_notes]
    lines += [f"  skipped {reason}" for reason in report.failed]
    return lines
