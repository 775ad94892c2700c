"""Every CVAT shape kind, hand-written in both formats exactly as CVAT writes it, read to the boxes and
pixels CVAT's exporter code implies. Expected values are computed by hand here, never by the readers.

Sources (as quoted in the project's export memo):
- XML shapes: cvat/apps/dataset_manager/formats/cvat.py ``dump_as_cvat_annotation`` (box xtl/ytl/
  xbr/ybr and ``rotation`` in degrees; ellipse cx cy rx ry rotation; mask ``rle`` runs starting with
  the count of zeros, row-major in its width x height box at left/top).
- Rotation: ``RotatedBoxesToPolygons`` (DM/formats/transformations.py): x' = cx + cos*(x-cx) -
  sin*(y-cy), y' = cy + sin*(x-cx) + cos*(y-cy) on the y-down axis: clockwise on screen.
- COCO: ``CvatToDmAnnotationConverter._convert_shape`` (bindings.py) gives an upright Bbox with
  ``attributes.rotation``; ``EllipsesToMasks`` draws ellipses with ``cv2.ellipse(centre, axes,
  angle=rotation)`` (clockwise, y down) into an RLE; datumaro's ``CocoExporter.find_instance_parts``
  merges groups (leader = largest area, bbox = union of the group's boxes, else of all parts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import cvat_writer as cw
from trainer.data.readers import load_dataset

W, H = 100, 80
LABELS = [{"name": "cell", "attributes": ["stage"]}, {"name": "nucleus", "attributes": ["stage"]}]
C30, S30 = math.sqrt(3) / 2, 0.5


def column_major_counts(pixels: set[tuple[int, int]]) -> list[int]:
    """COCO's uncompressed RLE of an image with ``pixels`` (x, y) set: runs over the column-major
    pixel order, starting with the count of zeros (which may be 0)."""
    counts, value, run = [], False, 0
    for x in range(W):
        for y in range(H):
            if ((x, y) in pixels) != value:
                counts.append(run)
                value, run = not value, 0
            run += 1
    return [*counts, run]


def read_xml(tmp_path, shapes: str):
    meta = cw.task_meta(3, LABELS, size=1)
    files = {"annotations.xml": cw.annotations_xml(meta, cw.image(0, "x.png", (W, H), shapes)),
             "images/x.png": cw.png((W, H))}  # fmt: skip
    return load_dataset([cw.write(tmp_path / "xml", files)]).images[0].shapes


def read_coco(tmp_path, annotations: list[dict]):
    images = [{"id": 1, "width": W, "height": H, "file_name": "x.png"}]
    categories = [("cell", ""), ("nucleus", "")]
    files = {"annotations/instances_default.json": cw.coco_json(categories, images, annotations),
             "images/default/x.png": cw.png((W, H))}  # fmt: skip
    return load_dataset([cw.write(tmp_path / "coco", files)]).images[0].shapes


def rle_annotation(pixels: set[tuple[int, int]], category: int = 1, **extra) -> dict:
    xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
    bbox = [float(min(xs)), float(min(ys)), float(max(xs) - min(xs) + 1), float(max(ys) - min(ys) + 1)]
    return {"image_id": 1, "category_id": category, "segmentation": {"counts": column_major_counts(pixels),
            "size": [H, W]}, "area": float(len(pixels)), "bbox": bbox, "iscrowd": 1,
            "attributes": {"occluded": False}, **extra}  # fmt: skip


def pixels_of(shape) -> set[tuple[int, int]]:
    ys, xs = np.nonzero(shape.to_mask(W, H))
    return set(zip(xs.tolist(), ys.tolist(), strict=True))


# ---------------------------------------------------------------- rotated box at 30 degrees

# The box (20, 30)-(60, 50), centre (40, 40), turned 30 degrees clockwise: its corners by hand
# with RotatedBoxesToPolygons' formula, (x0,y0), (x1,y0), (x1,y1), (x0,y1) in that order.
CORNERS = [
    (40 - 20 * C30 + 10 * S30, 40 - 20 * S30 - 10 * C30),
    (40 + 20 * C30 + 10 * S30, 40 + 20 * S30 - 10 * C30),
    (40 + 20 * C30 - 10 * S30, 40 + 20 * S30 + 10 * C30),
    (40 - 20 * C30 - 10 * S30, 40 - 20 * S30 + 10 * C30),
]
# 40 -/+ (20 cos30 + 10 sin30), 40 -/+ (20 sin30 + 10 cos30)
ENVELOPE = (17.6795, 21.3397, 62.3205, 58.6603)


def test_rotated_box_at_30_degrees_in_both_formats(tmp_path):
    xml = read_xml(tmp_path, cw.shape("box", "cell", occluded=0, xtl="20.00", ytl="30.00", xbr="60.00",
                                      ybr="50.00", rotation="30.00", z_order=0))  # fmt: skip
    coco = read_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": [], "area": 800.0,
                                 "bbox": [20.0, 30.0, 40.0, 20.0], "iscrowd": 0,
                                 "attributes": {"occluded": False, "rotation": 30.0}}])  # fmt: skip
    assert CORNERS[0] == pytest.approx((27.6795, 21.3397), abs=1e-4)  # up and right: clockwise
    for (shape,) in (xml, coco):
        assert shape.box == pytest.approx(ENVELOPE, abs=0.01)
        assert shape.rotation == 30.0
        assert shape.polygons[0] == pytest.approx([v for corner in CORNERS for v in corner], abs=0.01)


# ---------------------------------------------------------------- rotated ellipse, rx != ry

def cv2_ellipse_pixels(cx: int, cy: int, rx: int, ry: int, degrees: float) -> set[tuple[int, int]]:
    """What EllipsesToMasks' cv2.ellipse fills, to its boundary: integer pixels whose coordinates
    lie in the ellipse turned clockwise by ``degrees`` (y down)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {(x, y) for x in range(W) for y in range(H)
            if (((x - cx) * c + (y - cy) * s) / rx) ** 2 + ((-(x - cx) * s + (y - cy) * c) / ry) ** 2 <= 1}


def test_rotated_ellipse_in_both_formats_turns_clockwise(tmp_path):
    (xml,) = read_xml(tmp_path, cw.shape("ellipse", "cell", occluded=0, cx="50.00", cy="40.00", rx="20.00",
                                         ry="8.00", rotation="30.00", z_order=0))  # fmt: skip
    # bounds of an ellipse turned by t: cx -/+ sqrt((rx cos t)^2 + (ry sin t)^2), likewise for y
    ex, ey = math.sqrt(400 * 0.75 + 64 * 0.25), math.sqrt(400 * 0.25 + 64 * 0.75)
    assert xml.box == pytest.approx((50 - ex, 40 - ey, 50 + ex, 40 + ey), abs=0.01)
    assert xml.box == pytest.approx((32.2236, 27.8345, 67.7764, 52.1655), abs=0.01)
    # clockwise: the end of the major axis lies below-right of the centre, not above-right
    assert xml.to_mask(W, H)[47, 62] and not xml.to_mask(W, H)[32, 62]
    pixels = cv2_ellipse_pixels(50, 40, 20, 8, 30.0)
    assert (62, 47) in pixels and (62, 33) not in pixels
    (coco,) = read_coco(tmp_path, [rle_annotation(pixels, attributes={"occluded": False, "rotation": 30.0})])
    xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
    assert coco.box == (min(xs), min(ys), max(xs) + 1, max(ys) + 1)  # pixel extents (toBbox)
    assert pixels_of(coco) == pixels
    assert coco.box == pytest.approx(xml.box, abs=1.0)  # the formats agree to the pixel


# ---------------------------------------------------------------- masks

def test_mask_whose_rle_starts_with_ones(tmp_path):
    # "0, 3, 2, 1" in a 3x2 box at (10, 20): no zeros, three ones, two zeros, one one, row-major
    (xml,) = read_xml(tmp_path, cw.shape("mask", "cell", occluded=0, rle="0, 3, 2, 1", left=10, top=20,
                                         width=3, height=2, z_order=0))  # fmt: skip
    assert xml.kind == "mask" and xml.box == (10, 20, 13, 22)
    assert pixels_of(xml) == {(10, 20), (11, 20), (12, 20), (12, 21)}
    corner = {(0, 0), (0, 1)}  # COCO counts [0, 2, ...]: the image starts with ones
    (coco,) = read_coco(tmp_path, [rle_annotation(corner)])
    assert column_major_counts(corner)[:2] == [0, 2]
    assert coco.box == (0, 0, 1, 2) and pixels_of(coco) == corner


def test_polygon_in_both_formats(tmp_path):
    points = "10.50,20.25;30.75,22.00;15.00,40.50"
    (xml,) = read_xml(tmp_path, cw.shape("polygon", "cell", occluded=0, points=points, z_order=0))
    ring = [10.5, 20.25, 30.75, 22.0, 15.0, 40.5]
    (coco,) = read_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": [ring], "area": 180.0,
                                    "bbox": [10.5, 20.25, 20.25, 20.25], "iscrowd": 0,
                                    "attributes": {"occluded": False}}])  # fmt: skip
    for shape in (xml, coco):
        assert shape.box == pytest.approx((10.5, 20.25, 30.75, 40.5), abs=0.01) and shape.polygons == [ring]


# ---------------------------------------------------------------- groups

def test_group_of_parts_with_different_labels_takes_the_largest_parts_label_and_attributes(tmp_path):
    """Box 'cell' (area 200, stage early) + polygon 'nucleus' (shoelace 28 x 18 = 504, stage late,
    occluded): the polygon leads; the box of the group is the union of its boxes (CVAT >= 2.25)."""
    shapes = (
        cw.shape("box", "cell", occluded=0, xtl="10.00", ytl="10.00", xbr="30.00", ybr="20.00", z_order=0,
                 group_id=5, attributes={"stage": "early"})
        + cw.shape("polygon", "nucleus", occluded=1, points="12.00,12.00;40.00,12.00;40.00,30.00;12.00,30.00",
                   z_order=0, group_id=5, attributes={"stage": "late"})
    )  # fmt: skip
    ring = [12.0, 12.0, 40.0, 12.0, 40.0, 30.0, 12.0, 30.0]
    coco_ann = {"image_id": 1, "category_id": 2, "segmentation": [ring], "area": 504.0,
                "bbox": [10.0, 10.0, 20.0, 10.0], "iscrowd": 0,
                "attributes": {"stage": "late", "occluded": True}}
    for (shape,) in (read_xml(tmp_path, shapes), read_coco(tmp_path, [coco_ann])):
        assert (shape.label, shape.box, shape.occluded, shape.attributes) == (
            "nucleus", (10, 10, 30, 20), True, {"stage": "late"})  # fmt: skip
        assert shape.polygons == [ring]


def test_group_of_a_box_and_a_polygon_is_one_object_with_the_box(tmp_path):
    shapes = (
        cw.shape("box", "cell", occluded=0, xtl="50.00", ytl="40.00", xbr="90.00", ybr="70.00", z_order=0,
                 group_id=6, attributes={"stage": "early"})
        + cw.shape("polygon", "cell", occluded=0, points="55.00,45.00;85.00,45.00;70.00,68.00", z_order=0,
                   group_id=6, attributes={"stage": "early"})
        + cw.shape("box", "nucleus", occluded=0, xtl="1.00", ytl="1.00", xbr="9.00", ybr="9.00", z_order=0)
    )  # fmt: skip
    ring = [55.0, 45.0, 85.0, 45.0, 70.0, 68.0]
    anns = [{"image_id": 1, "category_id": 1, "segmentation": [ring], "area": 345.0,
             "bbox": [50.0, 40.0, 40.0, 30.0], "iscrowd": 0,
             "attributes": {"stage": "early", "occluded": False, "rotation": 0.0}},
            {"image_id": 1, "category_id": 2, "segmentation": [], "area": 64.0, "bbox": [1.0, 1.0, 8.0, 8.0],
             "iscrowd": 0, "attributes": {"stage": "", "occluded": False, "rotation": 0.0}}]  # fmt: skip
    for shapes_read in (read_xml(tmp_path, shapes), read_coco(tmp_path, anns)):
        grouped = next(s for s in shapes_read if s.label == "cell")
        assert (grouped.box, grouped.polygons) == ((50, 40, 90, 70), [ring])
        assert sorted(s.label for s in shapes_read) == ["cell", "nucleus"]


def test_group_with_a_mask_of_the_leaders_label_becomes_one_mask(tmp_path):
    """Mask 'cell' 10x6 at (60, 5) (60 pixels) + polygon 'cell' inside it (area 6): the mask leads,
    so use_masks; no box in the group, so the box is the union of all parts."""
    shapes = (
        cw.shape("polygon", "cell", occluded=0, points="62.00,6.00;66.00,6.00;64.00,9.00", z_order=0,
                 group_id=7)
        + cw.shape("mask", "cell", occluded=0, rle="0, 60", left=60, top=5, width=10, height=6, z_order=0,
                   group_id=7)
    )  # fmt: skip
    block = {(x, y) for x in range(60, 70) for y in range(5, 11)}
    for (shape,) in (read_xml(tmp_path, shapes), read_coco(tmp_path, [rle_annotation(block)])):
        assert (shape.label, shape.kind, shape.box) == ("cell", "mask", (60, 5, 70, 11))
        assert pixels_of(shape) == block
