"""CVAT shapes become exact, clipped, axis-aligned objects; non-objects are counted, not lost."""

from __future__ import annotations

import math

import numpy as np
import pytest
from faster_coco_eval.core import mask as mask_utils

from trainer.data.readers import load_dataset
from trainer.data.readers.geometry import rotated_envelope
from trainer.data.readers.masks import decode_coco_rle, decode_cvat_rle
from trainer.data.readers.parsed import CLIPPED, DEGENERATE, GROUPED, ROTATED

# A hand-made 4x3 mask and its CVAT RLE, run by run (row-major, first run counts zeros):
# rows 0110 / 0111 / 0001  ->  1 zero, 2 ones, 2 zeros, 3 ones, 3 zeros, 1 one
MASK = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
RLE = "1, 2, 2, 3, 3, 1"
GROUP = ' group_id="3"'


def image(shapes: str, width: int = 40, height: int = 30) -> str:
    return (
        f'<image id="0" name="x.png" subset="Train" task_id="1" width="{width}" height="{height}">'
        f"{shapes}</image>"
    )


def read(cvat_export, shapes: str, width: int = 40, height: int = 30):
    root = cvat_export(image(shapes, width, height), files={"Train/x.png": (width, height)})
    return load_dataset([root])


def shape_xml(tag: str, attrs: str, label: str = "a", extra: str = "") -> str:
    return (
        f'<{tag} label="{label}" source="manual" occluded="0" {attrs} z_order="0"{extra}></{tag}>'
    )


def test_cvat_rle_decodes_exactly():
    assert (decode_cvat_rle([1, 2, 2, 3, 3, 1], 4, 3) == MASK).all()
    assert (decode_cvat_rle([0, 2, 10], 4, 3)[0] == [True, True, False, False]).all()
    with pytest.raises(ValueError, match="covers 11 pixels, expected 4x3"):
        decode_cvat_rle([1, 2, 2, 3, 3], 4, 3)


def test_mask_shape_is_cropped_to_its_pixels_at_its_position(cvat_export):
    data = read(
        cvat_export, shape_xml("mask", f'rle="{RLE}" left="10" top="5" width="4" height="3"')
    )
    shape = data.images[0].shapes[0]
    assert shape.kind == "mask"
    assert shape.box == (11.0, 5.0, 14.0, 8.0)  # column 0 of the bitmap is empty
    expected = np.zeros((30, 40), dtype=bool)
    expected[5:8, 10:14] = MASK
    assert (shape.to_mask(40, 30) == expected).all()


def test_coco_rle_decodes_compressed_and_uncompressed_alike():
    full = np.zeros((3, 4), dtype=bool)
    full[1:3, 1:3] = True
    counts = [4, 2, 1, 2, 3]  # column-major: 4 zeros, 2 ones, 1 zero, 2 ones, 3 zeros
    assert (decode_coco_rle({"counts": counts, "size": [3, 4]}, 4, 3) == full).all()
    compressed = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode()
    assert (decode_coco_rle({"counts": compressed, "size": [3, 4]}, 4, 3) == full).all()
    with pytest.raises(ValueError, match=r"RLE size \[4, 3\] is not the image's"):
        decode_coco_rle({"counts": counts, "size": [4, 3]}, 4, 3)


@pytest.mark.parametrize("seed", range(4))
def test_coco_rle_window_decodes_any_mask_exactly(seed):
    """Decoded only where its runs are (a whole-slide RLE costs its object, not the slide), yet the
    same pixels as pycocotools' own decoder of the compressed form."""
    rng = np.random.default_rng(seed)
    full = np.zeros((23, 37), dtype=bool)
    full[rng.integers(0, 23) :, rng.integers(0, 37) : rng.integers(0, 37) + 3] = True
    full[0, 0] = seed % 2 == 0  # runs that start with ones, and runs that do not
    compressed = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    assert (mask_utils.decode(compressed).astype(bool) == full).all()
    text = {"counts": compressed["counts"].decode(), "size": [23, 37]}
    assert (decode_coco_rle(text, 37, 23) == full).all()
    assert not decode_coco_rle({"counts": [23 * 37], "size": [23, 37]}, 37, 23).any()


@pytest.mark.parametrize(
    ("degrees", "expected"),
    [
        (0, (10, 10, 30, 20)),
        (90, (15, 5, 25, 25)),
        (180, (10, 10, 30, 20)),
        (45, (20 - 15 / math.sqrt(2), 15 - 15 / math.sqrt(2), 20 + 15 / math.sqrt(2),
              15 + 15 / math.sqrt(2))),
    ],
)  # fmt: skip
def test_rotation_envelope(degrees, expected):
    assert rotated_envelope(10, 10, 30, 20, degrees) == pytest.approx(expected)


def test_rotated_box_trains_on_its_envelope_and_says_so(cvat_export):
    box = shape_xml("box", 'xtl="10.00" ytl="10.00" xbr="30.00" ybr="20.00" rotation="90.00"')
    data = read(cvat_export, box)
    shape = data.images[0].shapes[0]
    assert shape.box == pytest.approx((15, 5, 25, 25)) and shape.rotation == 90
    assert data.notes[ROTATED] == 1


def test_rotated_ellipse_box_and_outline(cvat_export):
    attrs = 'cx="20.00" cy="15.00" rx="10.00" ry="4.00" rotation="90.00"'
    shape = read(cvat_export, shape_xml("ellipse", attrs)).images[0].shapes[0]
    assert shape.kind == "ellipse"
    assert shape.box == pytest.approx((16, 5, 24, 25))
    area = shape.to_mask(40, 30).sum()
    assert abs(area - math.pi * 10 * 4) < 0.15 * math.pi * 10 * 4


def test_shapes_partly_outside_are_clipped_and_degenerate_ones_dropped(cvat_export):
    shapes = "".join(
        [
            shape_xml("box", 'xtl="-5.00" ytl="-3.00" xbr="10.00" ybr="10.00"'),  # clipped
            shape_xml("box", 'xtl="39.50" ytl="5.00" xbr="45.00" ybr="10.00"'),  # 0.5 px inside
            shape_xml("box", 'xtl="50.00" ytl="5.00" xbr="60.00" ybr="10.00"'),  # outside
            shape_xml("box", 'xtl="5.00" ytl="5.00" xbr="5.00" ybr="10.00"'),  # zero width
            shape_xml("polygon", 'points="30.00,20.00;50.00,20.00;40.00,40.00"'),  # clipped
        ]
    )
    data = read(cvat_export, shapes)
    boxes = [s.box for s in data.images[0].shapes]
    assert boxes == [(0, 0, 10, 10), (30, 20, 40, 30)]
    assert data.skipped[DEGENERATE] == 3 and data.notes[CLIPPED] == 2


def test_non_object_shapes_are_skipped_and_counted_per_kind(cvat_export):
    shapes = "".join(
        [
            shape_xml("points", 'points="1.00,1.00"'),
            shape_xml("polyline", 'points="1.00,1.00;5.00,5.00"'),
            '<tag label="a" source="manual"><attribute name="q">x</attribute></tag>',
            '<skeleton label="a" source="manual" z_order="0">'
            '<points label="k" source="manual" outside="0" occluded="0" points="2.00,2.00"/>'
            "</skeleton>",
            shape_xml("box", 'xtl="1.00" ytl="1.00" xbr="9.00" ybr="9.00"'),
        ]
    )
    data = read(cvat_export, shapes)
    assert len(data.images[0].shapes) == 1
    assert dict(data.skipped) == {"points": 1, "polyline": 1, "tag": 1, "skeleton": 1}


def test_grouped_shapes_become_one_object_like_cvat_coco_export(cvat_export):
    shapes = "".join(
        [
            shape_xml("box", 'xtl="2.00" ytl="2.00" xbr="20.00" ybr="20.00"', extra=GROUP),
            shape_xml("polygon", 'points="4.00,4.00;10.00,4.00;10.00,10.00"', extra=GROUP),
            shape_xml("polygon", 'points="12.00,12.00;18.00,12.00;18.00,18.00"', "b", GROUP),
            shape_xml("box", 'xtl="25.00" ytl="2.00" xbr="35.00" ybr="9.00"', "b"),
        ]
    )  # fmt: skip
    data = read(cvat_export, shapes)
    grouped, single = data.images[0].shapes
    assert (grouped.label, grouped.kind, grouped.box) == ("a", "polygon", (2, 2, 20, 20))
    assert len(grouped.polygons) == 2 and grouped.group == 3
    assert single.label == "b" and data.notes[GROUPED] == 1


def test_shape_attributes_and_occlusion_are_kept(cvat_export):
    box = (
        shape_xml("box", 'xtl="1.00" ytl="1.00" xbr="9.00" ybr="9.00"')
        .replace('occluded="0"', 'occluded="1"')
        .replace("></box>", '><attribute name="colour">red</attribute></box>')
    )
    shape = read(cvat_export, box).images[0].shapes[0]
    assert shape.occluded and shape.attributes == {"colour": "red"}


def test_task_export_without_subsets_uses_the_task_subset(tmp_path):
    root = tmp_path / "task"
    (root / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(root / "images" / "f.png")
    (root / "annotations.xml").write_text(
        "<annotations><version>1.1</version><meta><task><id>3</id><subset>Test</subset>"
        "<labels><label><name>z</name></label></labels></task></meta>"
        '<image id="0" name="f.png" width="16" height="16">'
        '<box label="z" source="manual" occluded="0" xtl="1" ytl="1" xbr="8" ybr="8" z_order="0"/>'
        "</image></annotations>"
    )
    data = load_dataset([root])
    assert data.labels == ["z"]
    assert data.images[0].key == ("Test", "f.png")
    assert data.images[0].path == root / "images" / "f.png"  # older layout: images/<name>
