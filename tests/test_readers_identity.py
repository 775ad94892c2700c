"""Which task an image came from: job exports keep their subset, same-named files of different tasks
stay different images (in reads, crops and servers), and one image read twice is refused."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from serverless.errors import UserError
from tests import cvat_writer as cw
from tests.factories import make_bundle
from trainer.commands import main
from trainer.cvat import server as cvat_server
from trainer.data.readers import load_dataset

SIZE = (40, 30)
LABELS = [{"name": "cell"}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAT_DETECTOR_CACHE", str(tmp_path / "cache"))


def box(x0, y0, x1, y1, label="cell") -> str:
    return cw.shape("box", label, occluded=0, xtl=f"{x0:.2f}", ytl=f"{y0:.2f}", xbr=f"{x1:.2f}",
                    ybr=f"{y1:.2f}", z_order=0)  # fmt: skip


def task_export(tmp_path, task_id: int, boxes: str, colour=(90, 120, 60), zipped=True):
    """A task export of one image img_001.png: <meta><task><id>, images/img_001.png."""
    meta = cw.task_meta(task_id, LABELS, size=1)
    files = {"annotations.xml": cw.annotations_xml(meta, cw.image(0, "img_001.png", SIZE, boxes)),
             "images/img_001.png": cw.png(SIZE, colour)}  # fmt: skip
    return cw.write(tmp_path / f"task_{task_id}{'.zip' if zipped else ''}", files, zipped)


def coco_task_export(tmp_path, stem: str, bbox: list[float], colour=(90, 120, 60)):
    """The COCO 1.0 export of such a task: no task id anywhere, only the file name."""
    images = [{"id": 1, "width": SIZE[0], "height": SIZE[1], "file_name": "img_001.png"}]
    anns = [{"image_id": 1, "category_id": 1, "segmentation": [], "area": bbox[2] * bbox[3], "bbox": bbox,
             "iscrowd": 0, "attributes": {"occluded": False, "rotation": 0.0}}]  # fmt: skip
    files = {"annotations/instances_default.json": cw.coco_json([("cell", "")], images, anns),
             "images/default/img_001.png": cw.png(SIZE, colour)}  # fmt: skip
    return cw.write(tmp_path / f"{stem}.zip", files, zipped=True)


def test_job_export_honours_the_subset_of_its_meta(tmp_path):
    """A job export: <meta><job><subset>Validation</subset>, absolute start_frame 10, <image id> =
    absolute frame, no subset or task_id on images (JobData._init_meta, cvat.py:838-853)."""
    meta = cw.job_meta(12, LABELS, size=2, start=10, subset="Validation")
    body = cw.image(10, "a.png", SIZE, box(1, 2, 11, 12)) + cw.image(11, "b.png", SIZE, box(5, 5, 20, 25))
    files = {"annotations.xml": cw.annotations_xml(meta, body), "images/a.png": cw.png(SIZE),
             "images/b.png": cw.png(SIZE)}  # fmt: skip
    data = load_dataset([cw.write(tmp_path / "job.zip", files, zipped=True)])
    assert [(im.identity, im.frame, im.task_id) for im in data.images] == [
        ("Validation/a.png", 10, None), ("Validation/b.png", 11, None)]  # fmt: skip
    assert [s.box for im in data.images for s in im.shapes] == [(1, 2, 11, 12), (5, 5, 20, 25)]
    assert main(["inspect", str(tmp_path / "job.zip"), "--json"]) == 0  # validation only: summarised


def test_validation_only_export_is_summarised_by_inspect(tmp_path, capsys):
    meta = cw.job_meta(12, LABELS, size=1, subset="Validation")
    files = {"annotations.xml": cw.annotations_xml(meta, cw.image(0, "a.png", SIZE, box(1, 2, 11, 12))),
             "images/a.png": cw.png(SIZE)}  # fmt: skip
    export = cw.write(tmp_path / "val", files)
    assert main(["inspect", str(export)]) == 0
    out = capsys.readouterr().out
    assert "split: train 0, val 1, test 0" in out and "no training images" in out
    assert main(["train", str(export), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "no training images" in capsys.readouterr().err
    run = make_bundle(tmp_path / "bundle", ["cell"])  # evaluate's default: the validation split
    assert main(["evaluate", str(run), str(export), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1


def test_same_file_names_in_two_task_exports_are_two_images(tmp_path):
    a = task_export(tmp_path, 15, box(1, 2, 11, 12))
    b = task_export(tmp_path, 16, box(20, 5, 30, 25), colour=(200, 10, 10))
    data = load_dataset([a, b])
    assert [(im.identity, im.task_id, im.frame) for im in data.images] == [
        ("task 15:default/img_001.png", 15, 0), ("task 16:default/img_001.png", 16, 0)]  # fmt: skip
    assert [im.shapes[0].box for im in data.images] == [(1, 2, 11, 12), (20, 5, 30, 25)]
    assert data.images[0].path != data.images[1].path
    alone = load_dataset([a])
    assert alone.images[0].identity == "default/img_001.png"  # no source when nothing clashes


def test_same_file_names_in_two_coco_exports_are_told_apart_by_their_file(tmp_path):
    a = coco_task_export(tmp_path, "cells_a", [1.0, 2.0, 10.0, 10.0])
    b = coco_task_export(tmp_path, "cells_b", [20.0, 5.0, 10.0, 20.0], colour=(200, 10, 10))
    data = load_dataset([a, b])
    assert [im.identity for im in data.images] == [
        "cells_a:default/img_001.png", "cells_b:default/img_001.png"]  # fmt: skip


def test_one_image_read_twice_is_refused(tmp_path):
    xml = task_export(tmp_path, 15, box(1, 2, 11, 12))
    copy = shutil.copy(xml, tmp_path / "task_15_copy.zip")
    with pytest.raises(UserError, match=r"default/img_001.png appears in both .*task_15.zip and .*_copy"):
        load_dataset([xml, copy])
    coco = coco_task_export(tmp_path, "task_15_coco", [1.0, 2.0, 10.0, 10.0])
    with pytest.raises(UserError, match="the same image twice"):  # one task in both formats
        load_dataset([xml, coco])


def test_crops_of_same_named_images_are_distinct_and_name_their_task(tmp_path):
    a = task_export(tmp_path, 15, box(1, 2, 11, 12))
    b = task_export(tmp_path, 16, box(20, 5, 30, 25), colour=(200, 10, 10))
    out = tmp_path / "crops"
    assert main(["crop", str(a), str(b), "--out", str(out), "--workers", "1"]) == 0
    rows = list(csv.DictReader((out / "metadata.csv").open()))
    assert sorted(r["task_id"] for r in rows) == ["15", "16"]
    assert len({r["crop_path"] for r in rows}) == 2
    assert all((out / r["crop_path"]).is_file() for r in rows)


class _Task:
    def __init__(self, export: bytes):
        self.updated_date, self.export = "2025-01-01", export

    def export_dataset(self, format_name, filename, *, include_images, location):
        assert format_name == "CVAT for images 1.1" and include_images
        with open(filename, "wb") as fh:
            fh.write(self.export)


def test_server_tasks_with_same_file_names_crop_with_their_task_ids(tmp_path, monkeypatch):
    """`crop --server URL --tasks 15,16`: CVAT's task exports carry the id only in <meta><task><id>."""
    from types import SimpleNamespace

    tasks = {t: _Task(task_export(tmp_path, t, box(1 + t, 2, 11 + t, 12)).read_bytes()) for t in (15, 16)}
    client = SimpleNamespace(api_map=SimpleNamespace(host="https://cvat.example.com"),
                             tasks=SimpleNamespace(retrieve=tasks.__getitem__))  # fmt: skip
    monkeypatch.setattr(cvat_server, "connect", lambda url: client)
    out = tmp_path / "crops"
    argv = ["crop", "--server", "https://cvat.example.com", "--tasks", "15,16", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "metadata.csv").open()))
    assert sorted((r["task_id"], r["x1"]) for r in rows) == [("15", "16"), ("16", "17")]


def test_video_task_from_a_server_reads_its_frames(tmp_path, monkeypatch):
    """What "CVAT for images 1.1" of a video task holds: frame_000000 in the XML, .PNG files."""
    from types import SimpleNamespace

    meta = cw.task_meta(21, LABELS, size=2, mode="interpolation", video_size=SIZE)
    body = cw.image(0, "frame_000000", SIZE, box(1, 2, 11, 12)) + cw.image(1, "frame_000001", SIZE)
    export = cw.write(tmp_path / "video.zip", {"annotations.xml": cw.annotations_xml(meta, body),
                      "images/frame_000000.PNG": cw.png(SIZE), "images/frame_000001.PNG": cw.png(SIZE)},
                      zipped=True)  # fmt: skip
    client = SimpleNamespace(api_map=SimpleNamespace(host="https://cvat.example.com"),
                             tasks=SimpleNamespace(retrieve={21: _Task(export.read_bytes())}.__getitem__))
    monkeypatch.setattr(cvat_server, "connect", lambda url: client)
    out = tmp_path / "crops"
    assert main(["crop", "--server", "https://x", "--tasks", "21", "--out", str(out)]) == 0
    (row,) = csv.DictReader((out / "metadata.csv").open())
    assert (row["source_image"], row["task_id"], row["frame"]) == ("frame_000000.PNG", "21", "0")
