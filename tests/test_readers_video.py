"""Video tasks as CVAT exports them: "CVAT for images 1.1", "CVAT for video 1.1" and "COCO 1.0" of
one task read as the same objects on the same frames (expected values written out by hand from
CVAT's dumpers, cvat/apps/dataset_manager/formats/cvat.py, as the export memo quotes them)."""

from __future__ import annotations

import pytest

from tests import cvat_writer as cw
from trainer.data.readers import load_dataset
from trainer.data.readers.cvat_xml import VIDEO_FORMAT
from trainer.data.readers.parsed import UNANNOTATED

SIZE = (64, 48)
LABELS = [{"name": "car", "attributes": ["color"]}, {"name": "person"}, {"name": "pose", "type": "skeleton"},
          {"name": "head", "type": "points", "parent": "pose"}]  # fmt: skip
# What every format must yield: frame -> [(label, box, occluded, attributes)].
EXPECTED = {
    0: [("car", (1.0, 2.0, 11.0, 12.0), False, {"color": "red"})],
    1: [("car", (2.0, 3.0, 12.0, 13.0), True, {"color": "red"}),
        ("person", (20.0, 10.0, 30.0, 25.0), False, {})],
    2: [("car", (40.0, 30.0, 50.0, 40.0), False, {"color": "blue"})],
}  # fmt: skip
POLYGON = "20.00,10.00;30.00,10.00;25.00,25.00"


def box(label, x0, y0, x1, y1, **attrs) -> str:
    return cw.shape("box", label, **attrs, xtl=f"{x0:.2f}", ytl=f"{y0:.2f}", xbr=f"{x1:.2f}", ybr=f"{y1:.2f}",
                    z_order=0)  # fmt: skip


def frame_files(subset: str = "", frames=range(4), ext: str = ".PNG") -> dict[str, bytes]:
    folder = f"images/{subset}/" if subset else "images/"
    return {f"{folder}frame_{f:06d}{ext}": cw.png(SIZE) for f in frames}


def images_format_task(tmp_path):
    """The task as "CVAT for images 1.1": interpolated shapes are plain shapes, outside frames are
    gone (group_by_frame), every frame is an <image> named frame_XXXXXX without extension."""
    red, blue = {"color": "red"}, {"color": "blue"}
    frames = [
        cw.image(0, "frame_000000", SIZE, box("car", 1, 2, 11, 12, occluded=0, attributes=red)),
        cw.image(1, "frame_000001", SIZE, box("car", 2, 3, 12, 13, occluded=1, attributes=red)
                 + cw.shape("polygon", "person", occluded=0, points=POLYGON, z_order=0)),
        cw.image(2, "frame_000002", SIZE, box("car", 40, 30, 50, 40, occluded=0, attributes=blue)
                 + cw.shape("skeleton", "pose", z_order=0).replace("></skeleton>", ">" + cw.shape(
                     "points", "head", outside=0, occluded=0, points="5.00,5.00") + "</skeleton>")),
        cw.image(3, "frame_000003", SIZE),
    ]  # fmt: skip
    meta = cw.task_meta(7, LABELS, size=4, mode="interpolation", video_size=SIZE)
    files = {"annotations.xml": cw.annotations_xml(meta, "".join(frames)), **frame_files()}
    return cw.write(tmp_path / "images_format.zip", files, zipped=True)


def video_format_task(tmp_path, meta: str | None = None, files: dict | None = None):
    """The same task as "CVAT for video 1.1" (dump_as_cvat_interpolation): a real track written out
    on every frame until its outside keyframe; a plain polygon on frame 1 as a track closed by an
    outside copy on frame 2; a plain box on frame 2, the second-to-last frame, with NO closing copy
    (cvat.py: only when frame + step < stop_frame); a skeleton track; no <image> elements."""
    red, blue = {"color": "red"}, {"color": "blue"}
    track = (
        '<track id="0" label="car" source="manual">'
        + box(None, 1, 2, 11, 12, frame=0, keyframe=1, outside=0, occluded=0, attributes=red)
        + box(None, 2, 3, 12, 13, frame=1, keyframe=0, outside=0, occluded=1, attributes=red)
        + box(None, 3, 4, 13, 14, frame=2, keyframe=1, outside=1, occluded=0, attributes=red)
        + "</track>"
    )
    polygon = (
        '<track id="1" label="person" source="manual">'
        + cw.shape("polygon", None, frame=1, keyframe=1, outside=0, occluded=0, points=POLYGON, z_order=0)
        + cw.shape("polygon", None, frame=2, keyframe=1, outside=1, occluded=0, points=POLYGON, z_order=0)
        + "</track>"
    )
    last = ('<track id="2" label="car" source="manual">'
            + box(None, 40, 30, 50, 40, frame=2, keyframe=1, outside=0, occluded=0, attributes=blue)
            + "</track>")
    skeleton = ('<track id="3" label="pose" source="manual"><skeleton frame="2" keyframe="1" z_order="0">'
                + '<points label="head" keyframe="1" outside="0" occluded="0" points="5.00,5.00"></points>'
                + "</skeleton></track>")  # fmt: skip
    meta = meta or cw.task_meta(7, LABELS, size=4, mode="interpolation", video_size=SIZE)
    body = track + polygon + last + skeleton
    files = {"annotations.xml": cw.annotations_xml(meta, body), **(frame_files() if files is None else files)}
    return cw.write(tmp_path / "video_format.zip", files, zipped=True)


def coco_task(tmp_path):
    """The same task as "COCO 1.0" from CVAT >= 2.32: file_name frame_000000.png (lower-case
    extension), images/default/, track_id and keyframe among the attributes."""
    images = [{"id": f + 1, "width": SIZE[0], "height": SIZE[1], "file_name": f"frame_{f:06d}.png"}
              for f in range(4)]  # fmt: skip
    attrs = {"color": "red", "occluded": False, "rotation": 0.0, "track_id": 0, "keyframe": True}
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": [], "area": 100.0, "bbox": [1.0, 2.0, 10.0, 10.0],
         "iscrowd": 0, "attributes": attrs},
        {"image_id": 2, "category_id": 1, "segmentation": [], "area": 100.0, "bbox": [2.0, 3.0, 10.0, 10.0],
         "iscrowd": 0, "attributes": {**attrs, "occluded": True, "keyframe": False}},
        {"image_id": 2, "category_id": 2, "segmentation": [[20.0, 10.0, 30.0, 10.0, 25.0, 25.0]],
         "area": 75.0, "bbox": [20.0, 10.0, 10.0, 15.0], "iscrowd": 0, "attributes": {"occluded": False}},
        {"image_id": 3, "category_id": 1, "segmentation": [], "area": 100.0, "bbox": [40.0, 30.0, 10.0, 10.0],
         "iscrowd": 0, "attributes": {"color": "blue", "occluded": False, "rotation": 0.0}},
    ]  # fmt: skip
    categories = [("car", ""), ("person", ""), ("pose", ""), ("head", "pose")]
    files = {"annotations/instances_default.json": cw.coco_json(categories, images, anns),
             **frame_files("default", ext=".png")}  # fmt: skip
    return cw.write(tmp_path / "coco.zip", files, zipped=True)


def objects(data) -> dict[int, list]:
    return {
        im.frame if im.frame is not None else int(im.name[6:12]): sorted(
            (s.label, tuple(round(v, 2) for v in s.box), s.occluded, s.attributes) for s in im.shapes)
        for im in data.images
    }  # fmt: skip


@pytest.mark.parametrize("build", [images_format_task, video_format_task, coco_task])
def test_a_video_task_reads_the_same_in_every_format(build, tmp_path):
    data = load_dataset([build(tmp_path)], cache_dir=tmp_path / "cache")
    assert objects(data) == {f: sorted(objs) for f, objs in EXPECTED.items()}
    assert data.labels == ["car", "person"]  # the skeleton and its point are no classes
    assert [im.identity for im in data.images] == [f"default/frame_00000{f}.png" for f in range(3)]
    assert all(im.path is not None and im.path.is_file() for im in data.images)
    assert data.skipped[UNANNOTATED] == 1  # frame 3
    if build is not coco_task:  # COCO names no task and no frame number
        assert {(im.task_id, im.frame) for im in data.images} == {(7, 0), (7, 1), (7, 2)}
        assert [im.path.name for im in data.images] == [f"frame_00000{f}.PNG" for f in range(3)]
        assert data.skipped["skeleton"] == 1


def test_video_format_keeps_every_frame_listed_in_meta(tmp_path):
    export = video_format_task(tmp_path)
    data = load_dataset([export], keep_empty=True, cache_dir=tmp_path / "cache")
    assert [im.name for im in data.images] == [f"frame_00000{f}.PNG" for f in range(4)]
    assert [len(im.shapes) for im in data.images] == [1, 2, 1, 0]  # nothing propagated to frame 3


def test_frames_deleted_in_cvat_have_no_file_and_are_not_listed(tmp_path):
    export = video_format_task(tmp_path, files=frame_files(frames=[0, 1, 2]))
    data = load_dataset([export], keep_empty=True, cache_dir=tmp_path / "cache")
    assert [im.frame for im in data.images] == [0, 1, 2]


def test_frame_step_and_start_frame_name_the_frames(tmp_path):
    """frame_filter step=5, start_frame 10: frames 10, 15, 20 (abs_frame_id = start + i * step)."""
    meta = cw.task_meta(9, LABELS, size=3, mode="interpolation", video_size=SIZE, start=10, step=5)
    body = ('<track id="0" label="car" source="manual">' + box(None, 1, 1, 9, 9, frame=15, keyframe=1,
            outside=0, occluded=0) + box(None, 1, 1, 9, 9, frame=20, keyframe=1, outside=1, occluded=0)
            + "</track>")  # fmt: skip
    files = {"annotations.xml": cw.annotations_xml(meta, body), **frame_files(frames=[10, 15, 20])}
    data = load_dataset([cw.write(tmp_path / "step", files)], keep_empty=True)
    assert [(im.frame, im.name, len(im.shapes)) for im in data.images] == [
        (10, "frame_000010.PNG", 0), (15, "frame_000015.PNG", 1), (20, "frame_000020.PNG", 0)]  # fmt: skip


def test_video_job_export_takes_its_size_subset_and_range_from_meta(tmp_path):
    """A job export: <meta><job> with the task's subset and the job's absolute start_frame; a video
    job's <original_size> directly under <meta> (JobData._init_meta); no task id anywhere."""
    meta = cw.job_meta(12, LABELS, video_size=SIZE, size=2, start=10, subset="Validation",
                       mode="interpolation")  # fmt: skip
    body = ('<track id="0" label="car" source="manual">'
            + box(None, 5, 5, 15, 15, frame=11, keyframe=1, outside=0, occluded=0) + "</track>")  # fmt: skip
    files = {"annotations.xml": cw.annotations_xml(meta, body), **frame_files(frames=[10, 11])}
    data = load_dataset([cw.write(tmp_path / "job", files)])
    (im,) = data.images
    assert (im.identity, im.frame, im.task_id, im.width, im.height) == (
        "Validation/frame_000011.png", 11, None, *SIZE)  # fmt: skip
    assert [(s.label, s.box) for s in im.shapes] == [("car", (5.0, 5.0, 15.0, 15.0))]


def test_video_project_export_numbers_frames_with_per_subset_offsets(tmp_path):
    """Project exports add a per-subset offset to a task's frames: task 4 follows task 3 (2 frames)
    in subset Train, so its frame 1 is frame_000003 (ProjectData._init_task_frame_offsets)."""
    tasks = [cw.unit_xml("task", 3, size=2, subset="Train", mode="interpolation", video_size=SIZE),
             cw.unit_xml("task", 4, size=2, subset="Train", mode="interpolation", video_size=SIZE)]
    meta = cw.project_meta(tasks, LABELS, subsets="Train")
    body = ('<track id="0" label="person" source="manual" task_id="4" subset="Train">'
            + box(None, 5, 5, 15, 15, frame=3, keyframe=1, outside=0, occluded=0) + "</track>")
    files = {"annotations.xml": cw.annotations_xml(meta, body), **frame_files("Train", frames=range(4))}
    data = load_dataset([cw.write(tmp_path / "project", files)], keep_empty=True)
    assert [(im.task_id, im.frame) for im in data.images] == [(3, 0), (3, 1), (4, 2), (4, 3)]
    last = data.images[3]
    assert last.identity == "Train/frame_000003.png" and last.shapes[0].label == "person"
    assert last.path.parent.name == "Train"


def test_video_format_is_named_in_the_parsed_export(tmp_path):
    from trainer.data.readers import read_export

    assert read_export(video_format_task(tmp_path), tmp_path / "cache").format == VIDEO_FORMAT


def test_project_images_export_adds_the_frame_extension_by_the_tasks_mode(tmp_path):
    """In a project, the task of an <image task_id> says whether it is a video (mode interpolation)."""
    tasks = [cw.unit_xml("task", 3, size=1, subset="Train", mode="interpolation", video_size=SIZE),
             cw.unit_xml("task", 4, size=1, subset="Train")]  # fmt: skip
    body = (cw.image(0, "frame_000000", SIZE, box("car", 1, 1, 9, 9, occluded=0), subset="Train", task_id=3)
            + cw.image(1, "scan", SIZE, box("car", 1, 1, 9, 9, occluded=0), subset="Train", task_id=4))
    files = {"annotations.xml": cw.annotations_xml(cw.project_meta(tasks, LABELS, "Train"), body),
             "images/Train/frame_000000.PNG": cw.png(SIZE), "images/Train/scan": cw.png(SIZE)}  # fmt: skip
    data = load_dataset([cw.write(tmp_path / "project", files)])
    assert [(im.name, im.task_id) for im in data.images] == [("frame_000000.PNG", 3), ("scan", 4)]


def test_evaluate_runs_on_a_video_format_export(tmp_path, capsys):
    import json

    from tests.factories import make_bundle
    from trainer.commands import main

    run = make_bundle(tmp_path / "run", ["car", "person"])
    export = video_format_task(tmp_path)
    assert main(["evaluate", str(run), str(export), "--subset", "all", "--json", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 3 and metrics["per_class"]["car"]["gt"] == 3
