"""The crop command end to end: files and metadata agree, re-runs, appends, bad input, models."""

from __future__ import annotations

import csv
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serverless.detector import Detector
from serverless.errors import UserError
from serverless.imageio import read_image
from trainer.commands import main
from trainer.crop.exporter import CropOptions, crop_annotations, crop_detections
from trainer.crop.output import COLUMNS
from trainer.crop.paths import image_stems, unique_names
from trainer.data.readers import load_dataset
from trainer.data.records import DetectionData, ImageRecord, Shape
from trainer.data.synth import generate


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAT_DETECTOR_CACHE", str(tmp_path / "cache"))


def rows_of(out: Path) -> list[dict[str, str]]:
    with (out / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def files_of(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {
        "metadata.csv"
    }


def crop(*args: object) -> int:
    return main(["crop", *map(str, args)])


def test_every_object_becomes_one_file_and_one_row_with_its_source_pixels(
    synth_exports, tmp_path, capsys
):
    out = tmp_path / "crops"
    assert crop(synth_exports["cvat"], "--out", out, "--workers", 2, "--padding", 3) == 0
    rows = rows_of(out)
    data = load_dataset([synth_exports["cvat"]])
    assert len(rows) == data.summary()["objects"] > 0
    assert files_of(out) == {r["crop_path"] for r in rows}
    paths = {im.key: im.path for im in data.images}
    for row in rows:
        src = read_image(paths[(row["subset"], row["source_image"])])
        x1, y1, x2, y2 = (int(row[k]) for k in ("x1", "y1", "x2", "y2"))
        pixels = np.asarray(Image.open(out / row["crop_path"]))
        assert np.array_equal(pixels, src[y1:y2, x1:x2])
        assert (int(row["width"]), int(row["height"])) == (x2 - x1, y2 - y1)
        assert row["crop_path"].startswith(f"{row['label']}/{row['subset']}/")
        assert row["score"] == "" and row["task_id"] and row["frame"]
    assert {r["subset"] for r in rows} == {"Train", "Validation"}
    printed = capsys.readouterr().out
    assert f"wrote {len(rows)} crops of " in printed and "objects/s" in printed

    single = tmp_path / "single"
    assert crop(synth_exports["cvat"], "--out", single, "--workers", 1, "--padding", 3) == 0
    assert all((single / p).read_bytes() == (out / p).read_bytes() for p in files_of(out))


def test_object_ids_come_from_the_export_or_the_shape_index(synth_exports, tmp_path):
    everything, circles = tmp_path / "all", tmp_path / "circles"
    assert crop(synth_exports["cvat"], "--out", everything) == 0
    assert crop(synth_exports["cvat"], "--out", circles, "--labels", "circle") == 0
    listed = {r["crop_path"] for r in rows_of(everything) if r["label"] == "circle"}
    assert files_of(circles) == listed  # ids (shape indices) do not shift when labels are chosen

    coco = tmp_path / "coco"
    assert crop(synth_exports["coco"], "--out", coco) == 0
    with zipfile.ZipFile(synth_exports["coco"]) as zf:
        doc = json.loads(zf.read("annotations/instances_Train.json"))
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    expected = {(names[a["image_id"]], str(a["id"])) for a in doc["annotations"]}
    got = {(r["source_image"], r["object_id"]) for r in rows_of(coco) if r["subset"] == "Train"}
    assert got == expected


def test_a_rerun_replaces_the_set_and_append_adds_to_it(synth_exports, tmp_path, capsys):
    out = tmp_path / "crops"
    assert crop(synth_exports["cvat"], "--out", out) == 0
    assert crop(synth_exports["cvat"], "--out", out, "--labels", "circle") == 0
    assert {r["label"] for r in rows_of(out)} == {"circle"}
    assert {p.parts[0] for p in map(Path, files_of(out))} == {"circle"}  # no stale crops
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    circles = rows_of(out)
    assert crop(synth_exports["cvat"], "--out", out, "--labels", "square", "--append") == 0
    rows = rows_of(out)
    assert rows[: len(circles)] == circles and {r["label"] for r in rows} == {"circle", "square"}
    assert files_of(out) == {r["crop_path"] for r in rows}

    before = (out / "metadata.csv").read_bytes()
    capsys.readouterr()
    assert crop(synth_exports["cvat"], "--out", out, "--labels", "square", "--append") == 2
    assert "already listed" in capsys.readouterr().err
    assert (out / "metadata.csv").read_bytes() == before and files_of(out) == {
        r["crop_path"] for r in rows
    }


def test_bad_inputs_are_clear_errors_that_change_nothing(synth_exports, tmp_path, capsys):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "thesis.txt").write_text("precious")
    assert crop(synth_exports["cvat"], "--out", keep) == 2
    assert "not a crop export" in capsys.readouterr().err
    assert (keep / "thesis.txt").read_text() == "precious"

    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    assert crop(synth_exports["cvat"], "--out", blocker / "crops") == 2
    assert f"{blocker / 'crops'}: cannot write the crops there" in capsys.readouterr().err

    assert crop(synth_exports["cvat"], "--out", tmp_path / "x", "--labels", "hexagon") == 2
    assert "unknown label(s) 'hexagon'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert crop(synth_exports["cvat"], "--out", tmp_path / "x", "--mask-alpha", "--format",
                "source") == 2  # fmt: skip
    assert "--mask-alpha" in capsys.readouterr().err


def test_missing_images_are_counted_or_skipped(tmp_path, capsys):
    export = generate(tmp_path, seed=4, train=3, val=1, empty=0, size=(96, 80), formats=["cvat"],
                      zipped=False)["cvat"]  # fmt: skip
    (export / "images" / "Train" / "synth_00002.jpg").unlink()
    assert crop(export, "--out", tmp_path / "crops") == 2
    assert "1 of 4 image files are missing" in capsys.readouterr().err
    assert crop(export, "--out", tmp_path / "crops", "--skip-missing") == 0
    sources = {r["source_image"] for r in rows_of(tmp_path / "crops")}
    assert sources == {"synth_00001.jpg", "synth_00003.jpg", "synth_00004.jpg"}


def test_every_shape_kind_with_mask_alpha_and_rotated_boxes_upright(synth_mixed_exports, tmp_path):
    out = tmp_path / "crops"
    assert crop(synth_mixed_exports["cvat"], "--out", out, "--mask-alpha", "--no-subsets") == 0
    rows = rows_of(out)
    assert len(rows) == load_dataset([synth_mixed_exports["cvat"]]).summary()["objects"]
    assert all(r["crop_path"].count("/") == 1 for r in rows)
    for row in rows:
        img = Image.open(out / row["crop_path"])
        assert img.mode == "RGBA" and img.size == (int(row["width"]), int(row["height"]))
        assert np.asarray(img)[..., 3].any()
    rotated = [r for r in rows if float(r["rotation"])]
    assert rotated, "the mixed export has rotated boxes"
    for row in rotated:  # the synthetic rotated objects are squares: upright, their crop is too
        assert abs(int(row["width"]) - int(row["height"])) <= 1


def test_format_source_keeps_jpeg(synth_exports, tmp_path):
    out = tmp_path / "crops"
    assert crop(synth_exports["coco"], "--out", out, "--format", "source") == 0
    assert {Path(p).suffix for p in files_of(out)} == {".jpg"}
    with Image.open(next(out.rglob("*.jpg"))) as img:
        assert img.format == "JPEG"


def test_detections_become_crops_with_scores(tmp_path, shared_bundle, capsys):
    export = generate(tmp_path, seed=5, train=1, val=1, empty=0, size=(96, 80), formats=["cvat"],
                      zipped=False)["cvat"]  # fmt: skip
    bundle = shared_bundle(["circle", "square"], min_size=64, max_size=96, detections_per_img=4)
    out, images = tmp_path / "detected", export / "images"
    assert crop("--model", bundle, "--images", images, "--threshold", 0, "--out", out,
                "--device", "cpu", "--workers", 2) == 0  # fmt: skip
    rows = rows_of(out)
    assert rows and files_of(out) == {r["crop_path"] for r in rows}
    assert {r["subset"] for r in rows} == {"detections"}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    for row in rows:
        src = read_image(images / row["source_image"])
        x1, y1, x2, y2 = (int(row[k]) for k in ("x1", "y1", "x2", "y2"))
        assert np.array_equal(np.asarray(Image.open(out / row["crop_path"])), src[y1:y2, x1:x2])
    first = rows[0]
    stem = Path(first["source_image"]).with_suffix("").as_posix().replace("/", "_")
    assert first["crop_path"] == f"{first['label']}/detections/{stem}__{first['object_id']}.png"

    detector = Detector(bundle, "cpu")
    only = crop_detections(detector, images, tmp_path / "only", CropOptions(progress=False),
                           threshold=0.0, labels=["square"])  # fmt: skip
    assert set(only.crops) <= {"square"}
    assert only.total == sum(r["label"] == "square" for r in rows)

    capsys.readouterr()
    assert crop("--model", bundle, "--images", images, "--out", out, "--labels", "hexagon") == 2
    assert "unknown label(s) 'hexagon'" in capsys.readouterr().err
    assert crop("--model", bundle, "--out", out) == 2
    assert "--model needs --images" in capsys.readouterr().err


def test_label_names_become_safe_distinct_folders(tmp_path):
    labels = ["../evil", "a/b", "a_b", "CON", "Cell", "cell", "x\x07y"]
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    shapes = [Shape(name, "rectangle", (1, 1, 9, 9)) for name in labels]
    image = ImageRecord("../Train", "sub/img.png", 40, 40, tmp_path / "img.png", shapes)
    out = tmp_path / "out" / "crops"
    crop_annotations(DetectionData(labels, [image]), out, CropOptions(progress=False))
    rows = rows_of(out)
    folders = [r["crop_path"].split("/")[0] for r in rows]
    assert folders == ["_evil", "a_b", "a_b_2", "_CON", "Cell", "cell_2", "x_y"]
    assert [r["label"] for r in rows] == labels
    assert {r["crop_path"].split("/", 1)[1] for r in rows} == {
        f"_Train/sub_img__{i}.png" for i in range(len(labels))
    }
    assert all((out / r["crop_path"]).resolve().is_relative_to(out.resolve()) for r in rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["crops"]


def test_image_stems_stay_distinct_and_stable():
    keys = [("Train", "a.jpg"), ("Train", "a.png"), ("Validation", "a.jpg"), ("Train", "d/e.jpg")]
    stems = image_stems(keys, by_subset=True)
    assert stems[2:] == ["a", "d_e"] and len(set(stems[:2])) == 2
    assert stems == image_stems(keys, by_subset=True)
    flat = image_stems(keys, by_subset=False)
    assert len({s.casefold() for s in flat}) == 4
    assert unique_names(["B", "b", "B"]) == {"B": "B", "b": "b_2"}


def test_duplicate_object_ids_stop_the_run_and_leave_nothing(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    shapes = [Shape("cell", "rectangle", (1, 1, 9, 9), object_id=7) for _ in range(2)]
    image = ImageRecord("Train", "img.png", 20, 20, tmp_path / "img.png", shapes)
    with pytest.raises(UserError, match=re.escape("written to 'cell/Train/img__7.png'")):
        crop_annotations(DetectionData(["cell"], [image]), tmp_path / "out", CropOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
