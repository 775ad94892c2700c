"""Pre-annotating CVAT tasks: exactly what reaches cvat-sdk, recorded by a fake client.

The fake stands where the project calls cvat-sdk (``client.tasks.retrieve``, ``task.get_meta``,
``get_labels``, ``get_annotations``, ``get_frame``, ``update_annotations``, ``update``); the
detector is a real bundle whose network is replaced by a predictable stand-in, so the frames,
labels and thresholds of every shape sent can be asserted exactly.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from cvat_sdk import models
from cvat_sdk.api_client.exceptions import ApiException, NotFoundException
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction

from serverless.detector import Detector
from serverless.errors import UserError
from trainer.commands import main
from trainer.cvat import server as cvat_server
from trainer.cvat.upload import (
    UploadOptions,
    annotated_frames,
    find_tasks,
    report_lines,
    upload_errors,
    upload_predictions,
)


class BrightObjects(torch.nn.Module):
    """Stand-in network: 'cell' on the bright pixels (score 0.9), 'debris' top-left (0.3)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        bright = images[0].mean(0) > 0.5
        h, w = bright.shape
        ys, xs = torch.nonzero(bright, as_tuple=True)
        boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [0, 0, w // 4, h // 4]]
        return [
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor([1, 2]),
                "scores": torch.tensor([0.9, 0.3]),
            }
        ]


def png(offset: int) -> bytes:
    rgb = np.full((48, 64, 3), 20, dtype=np.uint8)
    rgb[offset : offset + 10, offset + 5 : offset + 25] = 250
    data = io.BytesIO()
    PIL.Image.fromarray(rgb).save(data, format="PNG")
    return data.getvalue()


def cell_box(offset: int) -> list[float]:
    return [offset + 5.0, float(offset), offset + 25.0, offset + 10.0]


def label(label_id: int, name: str, type_: str = "any") -> models.Label:
    return models.Label._from_openapi_data(
        id=label_id, name=name, type=type_, attributes=[], sublabels=[], has_parent=False
    )


def keyframe(frame: int, outside: bool = False) -> SimpleNamespace:
    return SimpleNamespace(frame=frame, outside=outside)


class FakeTask:
    """Nine frames: 0 empty, 1 tagged, 2 corrupt, 3 with a shape, 4 empty, 5-6 inside a track,
    7 after the track went outside, 8 deleted."""

    def __init__(self, task_id: int, labels: list, project_id: int | None = None) -> None:
        self.id, self.name, self.project_id = task_id, f"task-{task_id}", project_id
        self.labels = labels
        self.frames = [png(i) for i in range(9)]
        self.frames[2] = b"not an image"
        self.annotations = SimpleNamespace(
            tags=[SimpleNamespace(frame=1)],
            shapes=[SimpleNamespace(frame=3)],
            tracks=[SimpleNamespace(shapes=[keyframe(7, outside=True), keyframe(5)])],
        )
        self.calls: list[tuple] = []

    def get_meta(self):
        names = [SimpleNamespace(name=f"f{i}.png") for i in range(9)]
        return SimpleNamespace(size=9, deleted_frames=[8], frames=names)

    def get_labels(self):
        return list(self.labels)

    def get_annotations(self):
        return self.annotations

    def get_frame(self, index: int, quality: str | None = None):
        self.calls.append(("get_frame", index, quality))
        return io.BytesIO(self.frames[index])

    def update_annotations(self, data, action):
        self.calls.append(("update_annotations", data, action))

    def update(self, request):
        self.calls.append(("update", request))
        self.labels += [label(100 + len(self.labels), x.name, x.type) for x in request.labels]

    def sent(self) -> list[tuple]:
        """(frame, label_id, type, points, score, source) of every shape sent, in order."""
        updates = [c for c in self.calls if c[0] == "update_annotations"]
        assert all(action is AnnotationUpdateAction.CREATE for _, _, action in updates)
        return [
            (s.frame, s.label_id, s.type.value, s.points, round(s.score, 3), s.source)
            for _, data, _ in updates
            for s in data.shapes
        ]

    def call_names(self) -> list[str]:
        return [c[0] for c in self.calls if c[0] != "get_frame"]


class FakeProject:
    def __init__(self, tasks: list[FakeTask]) -> None:
        self.tasks, self.calls = tasks, []

    def get_tasks(self):
        return list(self.tasks)

    def update(self, request):
        self.calls.append(request)
        for task in self.tasks:  # project labels are every task's labels
            task.labels += [label(200 + len(task.labels), x.name, x.type) for x in request.labels]


class FakeClient:
    def __init__(self, tasks: list[FakeTask], projects: dict[int, FakeProject] | None = None):
        by_id = {t.id: t for t in tasks}
        self.projects_by_id = projects or {}

        def retrieve(task_id):
            if task_id not in by_id:
                raise NotFoundException(status=404, reason="Not Found")
            return by_id[task_id]

        self.tasks = SimpleNamespace(retrieve=retrieve)
        self.projects = SimpleNamespace(retrieve=self.projects_by_id.__getitem__)

    def __enter__(self):  # cvat_sdk.Client is a context manager that logs out on exit
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.fixture(scope="module")
def detector(shared_bundle) -> Detector:
    bundle = shared_bundle(["cell", "debris"], threshold=0.5)
    detector = Detector(bundle, "cpu")
    detector.model = BrightObjects()
    return detector


def nv_labels() -> list:
    return [label(1, "cell"), label(2, "debris"), label(21, "cell_NV"), label(22, "debris_NV")]


def upload(client, detector, tasks, **options) -> list:
    return list(upload_predictions(client, detector, tasks, UploadOptions(**options)))


@pytest.mark.parametrize(
    ("threshold", "expected_labels"), [(None, [21]), (0.5, [21]), (0.2, [21, 22])]
)
def test_only_empty_frames_get_suffixed_shapes(detector, threshold, expected_labels):
    task = FakeTask(15, nv_labels())
    [report] = upload(FakeClient([task]), detector, [task], label_suffix="_NV", threshold=threshold)
    assert [c[1:] for c in task.calls if c[0] == "get_frame"] == [
        (0, "original"), (2, "original"), (4, "original"), (7, "original")
    ]  # fmt: skip
    expected = []
    for frame in (0, 4, 7):
        expected.append((frame, 21, "rectangle", cell_box(frame), 0.9, "auto"))
        if 22 in expected_labels:
            expected.append((frame, 22, "rectangle", [0.0, 0.0, 16.0, 12.0], 0.3, "auto"))
    assert task.sent() == expected
    assert task.call_names() == ["update_annotations"]  # one batch, no label changes
    assert (report.predicted, report.skipped) == (3, 4)
    assert len(report.failed) == 1 and "task 15 frame 2" in report.failed[0]
    assert report.shapes == {"cell_NV": 3} | ({"debris_NV": 3} if 22 in expected_labels else {})


def test_dry_run_sends_nothing_and_prints_per_frame(detector, capsys):
    task = FakeTask(15, [label(1, "cell"), label(2, "debris")])
    [report] = upload(
        FakeClient([task]), detector, [task], label_suffix="_NV", create_labels=True, dry_run=True
    )
    assert task.call_names() == []
    assert report.created == ["cell_NV", "debris_NV"]
    assert report.shapes == {"cell_NV": 3}
    out = capsys.readouterr().out
    assert "task 15 frame 0 (f0.png): cell_NV 1" in out
    assert "task 15 frame 4 (f4.png): cell_NV 1" in out
    lines = report_lines(report, dry_run=True)
    assert "would write 3 shape(s): cell_NV 3" in lines[0]
    assert "would create label(s): cell_NV, debris_NV" in lines[1]


def test_missing_suffixed_label_is_an_error(detector):
    task = FakeTask(15, [label(1, "cell"), label(2, "debris"), label(21, "cell_NV")])
    with pytest.raises(UserError, match=r"task 15 .*'debris_NV'.*--create-labels"):
        upload(FakeClient([task]), detector, [task], label_suffix="_NV")
    assert task.calls == []


def test_create_labels_on_a_task_copies_the_validated_label_type(detector):
    task = FakeTask(15, [label(1, "cell", "rectangle")])
    upload(FakeClient([task]), detector, [task], label_suffix="_NV", create_labels=True)
    update = task.calls[0]
    assert update[0] == "update" and isinstance(update[1], models.PatchedTaskWriteRequest)
    assert [(x.name, x.type) for x in update[1].labels] == [
        ("cell_NV", "rectangle"),
        ("debris_NV", "rectangle"),  # no validated 'debris': the type the model writes
    ]
    assert {s[1] for s in task.sent()} == {101}  # the new cell_NV id


def test_create_labels_in_a_project_updates_the_project_once(detector):
    tasks = [FakeTask(15, [label(1, "cell")], project_id=4), FakeTask(16, [], project_id=4)]
    project = FakeProject(tasks)
    client = FakeClient(tasks, {4: project})
    found = find_tasks(client, project_id=4)
    assert [t.id for t in found] == [15, 16]
    upload(client, detector, found, label_suffix="_NV", create_labels=True)
    assert len(project.calls) == 1
    assert isinstance(project.calls[0], models.PatchedProjectWriteRequest)
    assert [x.name for x in project.calls[0].labels] == ["cell_NV", "debris_NV"]
    assert all("update" not in t.call_names() for t in tasks)
    assert len(tasks[1].sent()) == 3


def test_model_label_missing_from_task_is_reported_not_sent(detector):
    task = FakeTask(15, [label(1, "cell")])
    [report] = upload(FakeClient([task]), detector, [task], threshold=0.2)
    assert {s[1] for s in task.sent()} == {1}
    assert report.missing == {"debris": 3}
    assert (
        "model labels missing from task 15, not uploaded: debris 3"
        in report_lines(report, dry_run=False)[1]
    )


def test_all_frames_adds_to_annotated_frames_without_deleting(detector):
    task = FakeTask(15, [label(1, "cell"), label(2, "debris")])
    [report] = upload(FakeClient([task]), detector, [task], all_frames=True)
    assert sorted({s[0] for s in task.sent()}) == [0, 1, 3, 4, 5, 6, 7]
    assert task.call_names() == ["update_annotations"]
    assert report.skipped == 0


def test_shapes_are_sent_in_batches_of_frames(detector):
    task = FakeTask(15, [label(1, "cell"), label(2, "debris")])
    upload(FakeClient([task]), detector, [task], batch_frames=2)
    batches = [[s.frame for s in c[1].shapes] for c in task.calls if c[0] == "update_annotations"]
    assert batches == [[0, 4], [7]]  # frame 2 is unreadable


def test_server_error_is_one_line_and_earlier_batches_stay(detector):
    task = FakeTask(15, [label(1, "cell"), label(2, "debris")])
    sent = []

    def fail_second(data, action):
        if sent:
            raise ApiException(status=500, reason="Internal Server Error")
        sent.append(data)

    task.update_annotations = fail_second
    expected = r"answered 500 Internal Server Error; shapes already sent"
    with pytest.raises(UserError, match=expected), upload_errors("https://cvat.example.org"):
        upload(FakeClient([task]), detector, [task], batch_frames=1)
    assert [s.frame for s in sent[0].shapes] == [0]


def test_created_label_takes_the_model_type_when_the_validated_one_cannot_hold_it(detector):
    task = FakeTask(15, [label(1, "cell", "polygon")])
    upload(FakeClient([task]), detector, [task], label_suffix="_NV", create_labels=True)
    created = [(x.name, x.type) for x in task.calls[0][1].labels]
    assert created == [("cell_NV", "rectangle"), ("debris_NV", "rectangle")]
    assert {s[1] for s in task.sent()} == {101}


def test_label_of_another_shape_type_is_refused(detector):
    task = FakeTask(15, [label(1, "cell", "polygon"), label(2, "debris")])
    with pytest.raises(UserError, match=r"'cell' is of type 'polygon'.*'rectangle'"):
        upload(FakeClient([task]), detector, [task])


def test_a_refused_label_leaves_every_task_as_it_was(detector):
    """--create-labels checks every label of every task before it creates any or sends a shape."""
    ready = FakeTask(15, [label(1, "cell")])
    wrong = FakeTask(16, [label(1, "cell"), label(22, "debris_NV", "polygon")])  # cell_NV missing
    refused = r"task 16: label 'debris_NV' is of type 'polygon'.*nothing was changed"
    with pytest.raises(UserError, match=refused):
        upload(FakeClient([ready, wrong]), detector, [ready, wrong], label_suffix="_NV", create_labels=True)
    assert ready.calls == [] and wrong.calls == []
    assert [x.name for x in wrong.labels] == ["cell", "debris_NV"]


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        find_tasks(FakeClient([]), [99])


def test_track_frames_count_as_annotated_until_outside():
    annotations = SimpleNamespace(
        tags=[],
        shapes=[],
        tracks=[
            SimpleNamespace(shapes=[keyframe(2), keyframe(4, outside=True), keyframe(6)]),
        ],
    )
    assert annotated_frames(annotations, size=9) == {2, 3, 6, 7, 8}


def test_cli_dry_run_against_a_server(monkeypatch, shared_bundle, capsys):
    """``predict --server``: the real (untrained) network, one empty frame, nothing sent."""
    bundle = shared_bundle(["cell", "debris"])
    task = FakeTask(15, nv_labels())
    task.annotations.shapes += [SimpleNamespace(frame=i) for i in range(2, 9)]  # all but frame 0
    urls = []
    monkeypatch.setattr(cvat_server, "connect", lambda url: urls.append(url) or FakeClient([task]))
    argv = ["predict", str(bundle), "--server", "https://cvat.example.org", "--tasks", "15"]
    assert main([*argv, "--nv", "--threshold", "0.1", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert urls == ["https://cvat.example.org"]
    assert task.call_names() == []
    assert [c[1] for c in task.calls if c[0] == "get_frame"] == [0]
    assert "task 15 frame 0 (f0.png): " in out and "_NV" in out
    assert "task 15 (task-15): 1 frame(s) predicted, 7 already annotated" in out  # 8 is deleted
    assert "dry run: nothing was sent" in out


def test_cli_server_needs_tasks_or_project(tmp_path, capsys):
    argv = ["predict", str(tmp_path), "--server", "https://cvat.example.org"]
    assert main(argv) == 2
    assert "--server needs --tasks IDS or --project ID" in capsys.readouterr().err
