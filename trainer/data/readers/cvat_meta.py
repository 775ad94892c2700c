"""The ``<meta>`` of a CVAT XML export: which task (or job) each frame belongs to, and the labels.

CVAT writes three kinds of meta (``cvat/apps/dataset_manager/bindings.py``): a task export has
``<meta><task>`` (``TaskData.meta_for_task``), a job export ``<meta><job>`` with the job's own
subset and absolute frame range and, for a video, ``<original_size>`` directly under ``<meta>``
(``JobData._init_meta``), a project export ``<meta><project><tasks><task>…`` and the project's
labels (``ProjectData._init_meta``). A video task's frames are named ``frame_{n:06d}`` and
numbered ``offset + start_frame + i * step`` for ``i < size``, where a project adds a per-subset
offset that grows by ``start_frame + step * size`` per task in (subset, id) order
(``ProjectData._init_task_frame_offsets``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trainer.data.readers.parsed import SKELETON_LABEL, TAG_LABEL, skeleton_point

#: Fields read from a <task> or <job> element (paths below it).
_FIELDS = {"id", "subset", "mode", "size", "start_frame", "frame_filter",
           "original_size/width", "original_size/height"}  # fmt: skip
_STEP = re.compile(r"step\s*=\s*(\d+)")


@dataclass
class Unit:
    """A task of the export, or the job of a job export, as its ``<meta>`` describes it."""

    task_id: int | None = None  # None in a job export: it names no task
    job_id: int | None = None
    subset: str = ""
    mode: str = ""  # "annotation" (images), "interpolation" (video), "" when not written
    size: int = 0
    start_frame: int = 0
    step: int = 1
    offset: int = 0  # project exports: added to the frame numbers of this task
    width: int = 0  # <original_size> of a video; 0 when not written (image tasks)
    height: int = 0

    @property
    def video(self) -> bool:
        return self.mode == "interpolation"

    def frames(self) -> range:
        """Every frame number of the unit, as CVAT numbers and names them."""
        first = self.offset + self.start_frame
        return range(first, first + self.size * self.step, self.step)


@dataclass
class Meta:
    kind: str = ""  # "task", "job", "project", or "" when <meta> holds none of them
    units: list[Unit] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # top-level labels, in export order
    not_classes: dict[str, str] = field(default_factory=dict)  # label -> why it is no class
    by_task: dict[int | None, Unit] = field(default_factory=dict)

    def unit(self, task_id: int | None) -> Unit:
        """The unit of a frame: its task's in a project, else the export's only one."""
        if task_id is None:
            return self.units[0] if self.units else _NO_UNIT
        if len(self.by_task) != len(self.units):  # built once, on the first frame
            self.by_task = {unit.task_id: unit for unit in self.units}
        return self.by_task.get(task_id) or Unit(task_id=task_id)


_NO_UNIT = Unit()


class MetaReader:
    """Fed every element end inside ``<annotations>`` until the first frame; builds a :class:`Meta`."""

    def __init__(self) -> None:
        self.meta = Meta()
        self.fields: dict[str, str] = {}
        self.label: dict[str, str] = {}
        self.sublabels: dict[str, str] = {}  # point label -> its skeleton
        self.job_size: dict[str, str] = {}  # <meta><original_size> of a video job

    def end(self, path: list[str], text: str) -> None:
        """The element at ``path`` (below <annotations>) ended with ``text``."""
        if path[-3:-1] == ["labels", "label"]:
            self.label[path[-1]] = text
        elif path[-2:] == ["labels", "label"]:
            self._add_label()
        elif path[:2] == ["meta", "original_size"] and len(path) == 3:
            self.job_size[path[2]] = text
        elif (depth := _unit_depth(path)) is not None:
            if len(path) == depth:
                self._add_unit(path[1])
            elif (key := "/".join(path[depth:])) in _FIELDS:
                self.fields[key] = text.strip()

    def finish(self) -> Meta:
        """The meta, with project offsets and a video job's frame size filled in."""
        meta = self.meta
        for point, parent in self.sublabels.items():
            if point not in meta.labels:  # a top-level label of the same name stays a label
                meta.not_classes.setdefault(point, skeleton_point(parent))
        if meta.kind == "job" and meta.units and self.job_size:
            meta.units[0].width, meta.units[0].height = _size(self.job_size, "")
        if meta.kind == "project":
            offset, subset = 0, None
            for unit in meta.units:
                if unit.subset != subset:
                    offset, subset = 0, unit.subset
                unit.offset = offset
                offset += unit.start_frame + unit.step * unit.size
        return meta

    def _add_label(self) -> None:
        name, kind, parent = (self.label.get(k, "") for k in ("name", "type", "parent"))
        self.label = {}
        if not name.strip():
            raise ValueError("a <label> has an empty <name>")
        if parent:
            self.sublabels[name] = parent
            return
        self.meta.labels.append(name)
        if kind == "tag":
            self.meta.not_classes[name] = TAG_LABEL
        elif kind == "skeleton":
            self.meta.not_classes[name] = SKELETON_LABEL

    def _add_unit(self, kind: str) -> None:
        fields, self.fields = self.fields, {}
        self.meta.kind = kind
        ident = _int(fields, "id", None)
        width, height = _size(fields, "original_size/")
        step = _STEP.search(fields.get("frame_filter", ""))
        self.meta.units.append(Unit(
            task_id=None if kind == "job" else ident, job_id=ident if kind == "job" else None,
            subset=fields.get("subset", ""), mode=fields.get("mode", ""), size=_int(fields, "size", 0),
            start_frame=_int(fields, "start_frame", 0), step=max(int(step.group(1)), 1) if step else 1,
            width=width, height=height,
        ))  # fmt: skip


def _unit_depth(path: list[str]) -> int | None:
    """Length of the path to the <task>/<job> element that ``path`` is in, if any."""
    if path[:2] in (["meta", "task"], ["meta", "job"]):
        return 2
    if path[:4] == ["meta", "project", "tasks", "task"]:
        return 4
    return None


def _int(fields: dict[str, str], key: str, default: int | None) -> int | None:
    text = fields.get(key, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"<{key}> of the export's <meta> is {text!r}, expected a whole number") from None


def _size(fields: dict[str, str], prefix: str) -> tuple[int, int]:
    width, height = (_int(fields, prefix + k, 0) for k in ("width", "height"))
    return max(width, 0), max(height, 0)
