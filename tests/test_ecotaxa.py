"""`crop --ecotaxa`: the TSV is checked with EcoTaxa's own import rules, restated here from its
import code (github.com/ecotaxa/ecotaxa_back: py/BO/Bundle.py finds ``**/ecotaxa*.tsv``;
py/BO/TSVFile.py ``open``, ``validate_structure``, ``validate_content``, ``validate_line``;
py/BO/Mappings.py ``PREDEFINED_FIELDS``, ``POSSIBLE_TYPES``, ``PREFIX_TO_TABLE``; DB/Object.py
``classif_qual``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.factories import make_bundle
from trainer.commands import main
from trainer.data.readers import load_dataset

#: Mappings.PREDEFINED_FIELDS (the columns EcoTaxa knows without a project mapping).
PREDEFINED = {
    "object_annotation_category", "object_annotation_category_id", "object_annotation_date",
    "object_annotation_person_name", "object_annotation_status", "object_id", "sample_id",
    "acq_id", "process_id", "object_lat", "object_lon", "object_date", "object_time", "object_link",
    "object_depth_min", "object_depth_max", "img_rank", "img_file_name",
    "sample_dataportal_descriptor", "acq_instrument",
}  # fmt: skip
#: Prefixes of extendable tables (PREFIX_TO_TABLE): a custom column is <prefix>_<name>.
EXTENDABLE = {"object", "acq", "process", "sample"}
TYPES = {"[f]", "[t]"}
STATUSES = {"predicted", "dubious", "validated"}


def ecotaxa_rows(tsv: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Read a TSV as EcoTaxa's import validates it; every rule broken fails the test."""
    assert tsv.name.startswith("ecotaxa") and tsv.suffix == ".tsv"  # Bundle.TSV_FILTERS
    raw = tsv.read_bytes()
    # TSVFile.open: Latin-1 unless a UTF-8 BOM; the BOM keeps non-ASCII labels and "µ" intact
    assert raw.startswith(b"\xef\xbb\xbf")
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter="\t", quotechar='"')
    names = [n.strip(" \t").lower() for n in reader.fieldnames]
    assert len(names) == len(set(names))
    types = dict(zip(names, next(reader).values(), strict=True))
    for name in names:  # validate_structure
        prefix, sep, _ = name.partition("_")
        assert sep, f"{name}: not Table_Field"
        if name not in PREDEFINED:
            assert prefix in EXTENDABLE, f"{name}: unknown table prefix"
        # EcoTaxa reads the type of object_* columns only, but its own exports type every column
        assert types[name] in TYPES, f"{name}: type {types[name]!r}"
        assert f"{prefix}_id" in names or prefix == "img", f"{prefix}_id is mandatory"
    rows = [dict(zip(names, row.values(), strict=True)) for row in reader]
    seen, sample_of = set(), {}
    for row in rows:  # validate_content / validate_line
        assert row["object_id"].strip(), "missing object_id"
        with Image.open(tsv.parent / row["img_file_name"]) as im:
            im.verify()
        # EcoTaxa bans a repeated (object_id, img_file_name) and takes a repeated object_id as one
        # more image of that object: one crop per object, so object_id alone must be unique
        assert row["object_id"] not in seen, f"duplicate object {row['object_id']}"
        seen.add(row["object_id"])
        # Topology: an acquisition belongs to one sample
        acq = sample_of.setdefault(row.get("acq_id", ""), row.get("sample_id", ""))
        assert acq == row.get("sample_id", ""), f"acquisition {row['acq_id']} in two samples"
        for name, kind in types.items():
            if kind == "[f]" and row[name].strip():
                float(row[name])
        assert row["object_annotation_status"] in STATUSES
    return types, rows


def crop(*args: object) -> int:
    return main(["crop", *map(str, args)])


def metadata(out: Path) -> list[dict[str, str]]:
    with (out / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_annotation_crops_import_with_their_box_sizes_and_samples(synth_exports, tmp_path):
    out = tmp_path / "crops"
    assert crop(synth_exports["cvat"], "--out", out, "--padding", 4, "--ecotaxa", "--pixel-size", 0.5) == 0
    types, rows = ecotaxa_rows(out / "ecotaxa_crops.tsv")
    crops = metadata(out)
    assert sorted(r["img_file_name"] for r in rows) == sorted(r["crop_path"] for r in crops)
    data = load_dataset([synth_exports["cvat"]])
    boxes = {(im.subset, im.name, i): s for im in data.images for i, s in enumerate(im.shapes)}
    for row, meta in zip(rows, crops, strict=True):
        shape = boxes[(meta["subset"], meta["source_image"], int(meta["object_id"]))]
        x1, y1, x2, y2 = shape.box  # the object's own box, not the padded cut
        assert [float(row[f"object_bbox_{k}"]) for k in ("x1", "y1", "x2", "y2")] == pytest.approx(
            [x1, y1, x2, y2], abs=1e-3)  # fmt: skip
        assert float(row["object_width_um"]) == pytest.approx((x2 - x1) * 0.5, abs=1e-3)
        assert float(row["object_height_um"]) == pytest.approx((y2 - y1) * 0.5, abs=1e-3)
        assert row["object_annotation_category"] == shape.label == row["object_cvat_label"]
        assert row["object_annotation_status"] == "validated" and row["object_score"] == ""
        assert row["object_source_image"] == meta["source_image"]
        assert meta["task_id"] and row["sample_id"] == f"task_{meta['task_id']}"  # a project export
        assert row["acq_id"] == f"{row['sample_id']}/{meta['source_image']}"
    assert "process_id" not in types  # no model made these objects


def test_not_validated_labels_are_predicted_objects_of_their_base_category(cvat_export, tmp_path):
    export = cvat_export(
        '<image id="0" name="a.png" subset="Train" width="40" height="30">'
        '<box label="cell" occluded="0" source="manual" xtl="1" ytl="2" xbr="11" ybr="12" z_order="0"/>'
        '<box label="cell_NV" occluded="1" source="auto" xtl="20" ytl="5" xbr="30" ybr="15" z_order="0"/>'
        "</image>",
        labels=("cell", "cell_NV"), files={"Train/a.png": (40, 30)},
    )  # fmt: skip
    out = tmp_path / "crops"
    assert crop(export, "--out", out, "--ecotaxa") == 0
    _, rows = ecotaxa_rows(out / "ecotaxa_crops.tsv")
    got = [(r["object_cvat_label"], r["object_annotation_category"], r["object_annotation_status"],
            r["object_occluded"], r["object_width_um"]) for r in rows]  # fmt: skip
    assert got == [("cell", "cell", "validated", "0", ""), ("cell_NV", "cell", "predicted", "1", "")]


def test_detection_crops_carry_score_and_model(tmp_path):
    images = tmp_path / "slides"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 64), (40 * i, 120, 200)).save(images / f"s{i}.png")
    run = make_bundle(tmp_path / "cells-v2", ["cell", "debris"], threshold=0.0, min_size=64, max_size=96)
    out = tmp_path / "crops"
    assert crop("--model", run, "--images", images, "--out", out, "--ecotaxa", "--device", "cpu") == 0
    types, rows = ecotaxa_rows(out / "ecotaxa_crops.tsv")
    assert rows and {types["process_id"], types["object_score"]} == {"[t]", "[f]"}
    for row in rows:
        assert row["object_annotation_status"] == "predicted"
        assert 0.0 <= float(row["object_score"]) <= 1.0
        assert row["process_id"] == row["process_model"] == "cells-v2"
        assert row["process_architecture"] == "fasterrcnn_mobilenet_v3_large_fpn"
        assert row["process_software"].startswith("cvat-detector ")


def test_append_extends_the_table_and_refuses_a_different_one(synth_exports, tmp_path, cvat_export, capsys):
    first = cvat_export(
        '<image id="0" name="extra.png" subset="More" width="40" height="30">'
        '<box label="circle" occluded="0" source="manual" xtl="1" ytl="2" xbr="11" ybr="12" z_order="0"/>'
        "</image>",
        labels=("circle",), files={"More/extra.png": (40, 30)},
    )  # fmt: skip
    out = tmp_path / "crops"
    assert crop(synth_exports["cvat"], "--out", out, "--ecotaxa") == 0
    before = len(ecotaxa_rows(out / "ecotaxa_crops.tsv")[1])
    assert crop(first, "--out", out, "--ecotaxa", "--append") == 0
    _, rows = ecotaxa_rows(out / "ecotaxa_crops.tsv")
    assert len(rows) == before + 1 == len(metadata(out))
    assert rows[-1]["sample_id"] == "More"
    capsys.readouterr()
    assert crop(first, "--out", tmp_path / "other", "--pixel-size", 2) == 2
    assert "--pixel-size" in capsys.readouterr().err
