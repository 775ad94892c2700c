"""The synthetic generator writes what a CVAT 2.x server writes, deterministically."""

from __future__ import annotations

import json
import re
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
from faster_coco_eval.core import mask as mask_utils

from trainer.commands import main
from trainer.data.synth import KINDS, coco_rle, cvat_rle, generate


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = {"train": 3, "val": 2, "empty": 1, "size": (128, 96), "shapes": "mixed"}
    a = generate(tmp_path / "a", seed=5, **kwargs)
    b = generate(tmp_path / "b", seed=5, **kwargs)
    c = generate(tmp_path / "c", seed=6, **kwargs)
    for fmt in ("cvat", "coco"):
        assert a[fmt].read_bytes() == b[fmt].read_bytes()
        assert a[fmt].read_bytes() != c[fmt].read_bytes()


def test_cvat_export_layout_matches_a_cvat_project_export(synth_exports, bccd_dir):
    zf = zipfile.ZipFile(synth_exports["cvat"])
    names = zf.namelist()
    assert names[0] == "annotations.xml"
    assert {n.split("/")[1] for n in names[1:]} == {"Train", "Validation"}
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    xml = zf.read("annotations.xml").decode()
    real = zipfile.ZipFile(bccd_dir / "bccd_cvat11.zip").read("annotations.xml").decode()
    assert xml.splitlines()[:4] == real.splitlines()[:4]  # declaration, root, version, meta
    assert xml.endswith("</annotations>\n")
    root, real_root = ElementTree.fromstring(xml), ElementTree.fromstring(real)
    assert [e.tag for e in root.find("meta/project")] == [
        e.tag for e in real_root.find("meta/project")
    ]
    assert root.find("meta/project/subsets").text.split("\n") == ["Train", "Validation"]
    images = root.findall("image")
    assert len(images) == 18
    assert list(images[0].attrib) == ["id", "name", "subset", "task_id", "width", "height"]
    box = root.find("image/box")
    assert list(box.attrib) == list(real_root.find("image/box").attrib)
    assert re.fullmatch(r"\d+\.\d\d", box.get("xtl"))
    for im in images:
        assert f"images/{im.get('subset')}/{im.get('name')}" in names
    assert sum(1 for im in images if len(im) == 0) == 2  # the unannotated images are listed


def test_coco_export_layout_matches_a_cvat_coco_export(synth_mixed_exports, bccd_dir):
    zf = zipfile.ZipFile(synth_mixed_exports["coco"])
    real = json.loads(
        zipfile.ZipFile(bccd_dir / "bccd_coco10.zip").read("annotations/instances_Train.json")
    )
    docs = {
        s: json.loads(zf.read(f"annotations/instances_{s}.json")) for s in ("Train", "Validation")
    }
    for doc in docs.values():
        assert list(doc) == list(real)
        assert list(doc["images"][0]) == list(real["images"][0])
        assert list(doc["annotations"][0]) == list(real["annotations"][0])
        assert [c["name"] for c in doc["categories"]] == ["circle", "square", "triangle"]
        for im in doc["images"]:
            assert im["file_name"] in {n.rsplit("/", 1)[1] for n in zf.namelist()}
    anns = [a for d in docs.values() for a in d["annotations"]]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(set(a["segmentation"]) == {"counts", "size"} for a in crowd)
    boxes = [a for a in anns if not a["segmentation"]]
    assert all(a["attributes"] == {"occluded": False, "rotation": a["attributes"]["rotation"]}
               for a in boxes)  # fmt: skip
    assert any(a["attributes"]["rotation"] for a in boxes)


def test_mixed_export_has_every_cvat_shape_kind(synth_mixed_exports):
    xml = zipfile.ZipFile(synth_mixed_exports["cvat"]).read("annotations.xml").decode()
    for tag in ("box", "polygon", "mask", "ellipse", "points", "tag"):
        assert f"<{tag} " in xml, tag
    assert 'rotation="' in xml and 'group_id="' in xml


def test_rle_helpers_follow_cvat_and_coco_conventions():
    bitmap = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    assert cvat_rle(bitmap) == [0, 2, 2, 2]  # row-major, starts with a 0-run
    assert coco_rle(bitmap) == {"counts": [0, 1, 1, 2, 1, 1], "size": [2, 3]}  # column-major
    assert (mask_utils.decode(mask_utils.frPyObjects(coco_rle(bitmap), 2, 3)) == bitmap).all()


@pytest.mark.parametrize("shapes", ["box", "polygon", "mask"])
def test_objects_are_drawn_in_their_label_colour(tmp_path, shapes):
    from serverless.imageio import read_image
    from trainer.data.readers import load_dataset

    path = generate(tmp_path, train=2, val=1, empty=0, shapes=shapes, formats=["cvat"])["cvat"]
    data = load_dataset([path], cache_dir=tmp_path / "cache")
    for im in data.images:
        rgb = read_image(im.path).astype(int)
        for shape in im.shapes:
            inside = rgb[shape.to_mask(im.width, im.height)].mean(axis=0)
            dominant = {"circle": 0, "square": 2, "triangle": 0}[shape.label]
            assert inside.argmax() == dominant, (im.name, shape.label, inside)


def test_cli_writes_both_formats_and_prints_counts(tmp_path, capsys):
    code = main(["synth", str(tmp_path), "--train", "2", "--val", "1", "--empty", "1",
                 "--size", "96x80", "--no-zip"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "synth_cvat11" / "annotations.xml").is_file()
    assert (tmp_path / "synth_coco10" / "annotations" / "instances_Train.json").is_file()
    assert "images: 4 (3 with objects)" in out


def test_groups_are_written_to_coco_as_cvats_exporter_merges_them():
    """datumaro's find_instance_parts: the largest part (polygon shoelace 28 x 18 = 504 > box 200)
    gives the category; the bbox is the union of the group's boxes; polygons are the outline."""
    from trainer.data.synth import _Ann, _coco_instances, _Image

    ring = [12.0, 12.0, 40.0, 12.0, 40.0, 30.0, 12.0, 30.0]
    anns = [_Ann("rectangle", "circle", [10.0, 10.0, 30.0, 20.0], group=1),
            _Ann("polygon", "square", ring, group=1), _Ann("rectangle", "circle", [50.0, 50.0, 60.0, 58.0])]
    (grouped, single) = _coco_instances(_Image("Train", 1, 0, "x.jpg", 100, 80, b"", anns), list(KINDS))
    assert grouped["category_id"] == 2 and grouped["bbox"] == [10.0, 10.0, 20.0, 10.0]
    assert grouped["segmentation"] == [ring] and grouped["iscrowd"] == 0
    assert grouped["attributes"] == {"occluded": False}  # the leader is a polygon: no rotation
    assert single["bbox"] == [50.0, 50.0, 10.0, 8.0] and single["attributes"]["rotation"] == 0.0
