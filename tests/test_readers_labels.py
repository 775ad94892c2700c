"""Labels that hold no object (tag and skeleton labels, skeleton points, labels whose every shape is
skipped) are no model classes in either format; inspect says why, --labels naming one is an error."""

from __future__ import annotations

import json
import re

import pytest

from serverless.errors import UserError
from tests import cvat_writer as cw
from trainer.commands import main
from trainer.data.readers import load_dataset
from trainer.data.readers.parsed import NO_OBJECTS, SKELETON_LABEL, TAG_LABEL, skeleton_point

SIZE = (40, 30)
# A project's labels as _convert_db_labels lists them: sub-labels as <label> with <parent>.
LABELS = [{"name": "cell"}, {"name": "weather", "type": "tag"}, {"name": "pose", "type": "skeleton"},
          {"name": "head", "type": "points", "parent": "pose"}, {"name": "dust", "type": "any"}]  # fmt: skip


def project_xml(tmp_path):
    skeleton = ('<skeleton label="pose" source="manual" z_order="0"><points label="head" source="manual" '
                'outside="0" occluded="0" points="5.00,5.00"></points></skeleton>')  # fmt: skip
    shapes = (
        cw.shape("box", "cell", occluded=0, xtl="1.00", ytl="2.00", xbr="11.00", ybr="12.00", z_order=0)
        + cw.shape("points", "dust", occluded=0, points="20.00,20.00", z_order=0)
        + skeleton
        + cw.shape("tag", "weather")
    )
    meta = cw.project_meta([cw.unit_xml("task", 1, size=1, subset="Train")], LABELS, subsets="Train")
    body = cw.image(0, "a.png", SIZE, shapes, subset="Train", task_id=1)
    files = {"annotations.xml": cw.annotations_xml(meta, body), "images/Train/a.png": cw.png(SIZE)}
    return cw.write(tmp_path / "xml", files)


def project_coco(tmp_path):
    """COCO lists every label as a category (the point with supercategory = its skeleton) and only
    the box as an annotation: tags, skeletons and points are not COCO instances."""
    categories = [("cell", ""), ("weather", ""), ("pose", ""), ("head", "pose"), ("dust", "")]
    images = [{"id": 1, "width": SIZE[0], "height": SIZE[1], "file_name": "a.png"}]
    anns = [{"image_id": 1, "category_id": 1, "segmentation": [], "area": 100.0,
             "bbox": [1.0, 2.0, 10.0, 10.0], "iscrowd": 0,
             "attributes": {"occluded": False, "rotation": 0.0}}]
    files = {"annotations/instances_Train.json": cw.coco_json(categories, images, anns),
             "images/Train/a.png": cw.png(SIZE)}  # fmt: skip
    return cw.write(tmp_path / "coco", files)


def test_only_labels_with_objects_are_classes_in_both_formats(tmp_path):
    xml, coco = load_dataset([project_xml(tmp_path)]), load_dataset([project_coco(tmp_path)])
    for data in (xml, coco):
        assert data.labels == ["cell"]
        assert [(s.label, s.box) for s in data.images[0].shapes] == [("cell", (1, 2, 11, 12))]
        assert data.not_classes["pose"] == SKELETON_LABEL
        assert data.not_classes["head"] == skeleton_point("pose")
    assert xml.not_classes == {"weather": TAG_LABEL, "pose": SKELETON_LABEL,
                               "dust": "every shape skipped (points 1)", "head": skeleton_point("pose")}
    assert coco.not_classes["weather"] == coco.not_classes["dust"] == NO_OBJECTS  # COCO keeps no types


@pytest.mark.parametrize("name", ["weather", "pose", "head", "dust"])
def test_labels_option_naming_a_label_without_objects_says_why(tmp_path, name):
    message = rf"--labels: label '{name}' is no class a detector can learn: .*labels with objects: cell$"
    with pytest.raises(UserError, match=message):
        load_dataset([project_xml(tmp_path)], labels=["cell", name])
    with pytest.raises(UserError, match=rf"--merge-label all: label '{name}' is no class"):
        load_dataset([project_xml(tmp_path)], merge={"all": ["cell", name]})


def test_inspect_lists_labels_that_are_no_class_with_the_reason(tmp_path, capsys):
    export = project_xml(tmp_path)
    assert main(["inspect", str(export)]) == 0
    out = capsys.readouterr().out
    assert "labels: 1" in out and "not a class" in out
    for line in (r"weather +tag label", r"pose +skeleton label", r"dust +every shape skipped \(points 1\)",
                 r"head +point of skeleton 'pose'"):
        assert re.search(line, out), line
    assert main(["inspect", str(export), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels"] == ["cell"] and summary["not_classes"]["weather"] == TAG_LABEL
    assert main(["crop", str(export), "--out", str(tmp_path / "crops"), "--labels", "weather"]) == 2
    assert "'weather' holds no objects to crop: tag label" in capsys.readouterr().err
