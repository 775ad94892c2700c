"""Detections → CVAT shapes, and masks → polygons: the JSON CVAT's lambda manager consumes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from serverless.cvat_shapes import mask_shape, to_cvat_shapes
from serverless.detector import Detections
from serverless.mask_polygon import largest_component, mask_to_polygon, simplify_ring, trace_outline


def assert_cvat_shapes(shapes: Any, width: int, height: int, labels: list[str]) -> None:
    """Every shape exactly as CVAT reads it: plain JSON types, confidence a string, points in the
    image, a label from the spec, masks of (w * h) + 4 values of 0/255 then their inclusive box."""
    assert type(shapes) is list
    json.dumps(shapes)  # plain values only: numpy scalars would fail or be stringified
    for shape in shapes:
        assert set(shape) >= {"label", "type", "points", "confidence", "attributes"}
        assert type(shape["label"]) is str and shape["label"] in labels
        assert type(shape["confidence"]) is str and 0.0 <= float(shape["confidence"]) <= 1.0
        assert shape["attributes"] == []
        points = shape["points"]
        assert type(points) is list and all(type(v) is float for v in points)
        assert len(points) % 2 == 0
        xs, ys = points[0::2], points[1::2]
        assert all(0.0 <= x <= width for x in xs) and all(0.0 <= y <= height for y in ys)
        if shape["type"] == "rectangle":
            assert len(points) == 4 and xs[0] <= xs[1] and ys[0] <= ys[1]
            continue
        assert shape["type"] == "mask"
        assert len(points) >= 6  # a polygon of at least three vertices
        mask = shape["mask"]
        assert type(mask) is list and all(type(v) is int for v in mask)
        xtl, ytl, xbr, ybr = mask[-4:]
        assert 0 <= xtl <= xbr < width and 0 <= ytl <= ybr < height
        assert len(mask) == (xbr - xtl + 1) * (ybr - ytl + 1) + 4
        assert set(mask[:-4]) <= {0, 255} and 255 in mask[:-4]


def _shoelace(points: list[float] | np.ndarray) -> float:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def test_rectangles_are_plain_values_in_cvat_layout():
    det = Detections(
        boxes=np.array([[10.123, 20.5, 30.0, 40.987], [0.0, 0.0, 64.0, 48.0]], dtype=np.float32),
        scores=np.array([0.93, 0.5], dtype=np.float32),
        labels=["cell", "debris"],
    )
    shapes = to_cvat_shapes(det)
    assert_cvat_shapes(shapes, 64, 48, ["cell", "debris"])
    assert shapes[0] == {
        "label": "cell",
        "type": "rectangle",
        "points": [10.12, 20.5, 30.0, 40.99],
        "confidence": "0.93",
        "attributes": [],
    }
    assert [s["label"] for s in shapes] == ["cell", "debris"]


def test_mask_carries_cvat_bitmap_and_polygon_in_image_pixels():
    bitmap = np.zeros((4, 6), dtype=bool)
    bitmap[1:3, 2:5] = True  # a 3x2 block inside the crop
    det = Detections(
        boxes=np.array([[100.0, 50.0, 106.0, 54.0]], dtype=np.float32),
        scores=np.array([0.8], dtype=np.float32),
        labels=["cell"],
        masks=[bitmap],
        mask_boxes=[(100, 50, 105, 53)],
    )
    (shape,) = to_cvat_shapes(det)
    assert_cvat_shapes([shape], 200, 100, ["cell"])
    assert shape["type"] == "mask"
    decoded = np.array(shape["mask"][:-4]).reshape(4, 6)  # row-major crop of the inclusive box
    assert np.array_equal(decoded == 255, bitmap)
    assert shape["mask"][-4:] == [100, 50, 105, 53]
    # the polygon is the block's outline in image pixels: x 102..105, y 51..53
    assert shape["points"] == [102.0, 51.0, 105.0, 51.0, 105.0, 53.0, 102.0, 53.0]


def test_empty_mask_is_left_out_and_a_wrong_crop_is_refused():
    det = Detections(
        boxes=np.array([[0, 0, 4, 4]], dtype=np.float32),
        scores=np.array([0.9], dtype=np.float32),
        labels=["cell"],
        masks=[np.zeros((4, 4), dtype=bool)],
        mask_boxes=[(0, 0, 3, 3)],
    )
    assert to_cvat_shapes(det) == []
    with pytest.raises(ValueError, match="does not cover its box"):
        mask_shape(np.ones((3, 3), dtype=bool), (0, 0, 3, 3))


def test_polygon_of_a_single_pixel_and_of_an_l_shape():
    assert mask_to_polygon(np.ones((1, 1), dtype=bool)) == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    ell = np.array([[1, 0], [1, 1]], dtype=bool)
    assert mask_to_polygon(ell, tolerance=0) == [
        0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 0.0, 2.0,
    ]  # fmt: skip
    assert mask_to_polygon(np.zeros((3, 3), dtype=bool)) == []


def test_polygon_follows_the_largest_component_only():
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:5, 2:5] = True  # 9 px
    mask[8:18, 10:28] = True  # 180 px: the one to outline
    mask[5, 5] = True  # touches the small block only diagonally: not part of it
    poly = np.array(mask_to_polygon(mask)).reshape(-1, 2)
    assert poly[:, 0].min() == 10 and poly[:, 0].max() == 28
    assert poly[:, 1].min() == 8 and poly[:, 1].max() == 18
    assert _shoelace(poly) == 180


def test_outline_encloses_component_and_holes_and_simplifies_within_tolerance():
    yy, xx = np.mgrid[:80, :120]
    disk = (xx - 60) ** 2 / 50**2 + (yy - 40) ** 2 / 30**2 <= 1
    ring = disk & ~((xx - 60) ** 2 + (yy - 40) ** 2 <= 15**2)
    outline = trace_outline(largest_component(ring))
    assert _shoelace(outline) == disk.sum()  # the hole is inside the outer boundary
    simplified = simplify_ring(outline, 1.0)
    assert 3 <= len(simplified) < len(outline) / 4
    assert abs(_shoelace(simplified) - disk.sum()) / disk.sum() < 0.02


@pytest.mark.parametrize("seed", range(5))
def test_random_masks_give_valid_polygons_of_their_largest_component(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((25, 35)) < 0.55
    component = largest_component(mask)
    assert component is not None and not (component & ~mask).any()
    outline = trace_outline(component)
    assert _shoelace(outline) >= component.sum()  # clockwise on screen, encloses every pixel
    poly = mask_to_polygon(mask)
    assert len(poly) >= 6 and all(0 <= v <= 35 for v in poly)
