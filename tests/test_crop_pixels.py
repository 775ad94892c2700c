"""Crops are the exact source pixels: edges, clipping, padding, squaring, rotation, alpha."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trainer.crop.exporter import CropOptions, crop_annotations
from trainer.crop.geometry import CropSpec, upright_box
from trainer.data.readers.geometry import ellipse_polygon, rotated_envelope
from trainer.data.records import DetectionData, ImageRecord, Shape

W, H = 160, 120
GREY = (7, 8, 9)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A noise image saved losslessly: every pixel is distinct enough to catch a 1-px shift."""
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("src") / "frame 01.png"
    Image.fromarray(rgb).save(path)
    return path, rgb


def crop(tmp_path, source, shapes, **spec):
    """Run the exporter on one image; return {object_id: (pixels, metadata row)}."""
    path, _ = source
    image = ImageRecord("Train", "frame 01.png", W, H, path, shapes)
    data = DetectionData(labels=sorted({s.label for s in shapes}), images=[image])
    out = tmp_path / "crops"
    crop_annotations(data, out, CropOptions(spec=CropSpec(**spec), progress=False))
    with (out / "metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        int(r["object_id"]): (np.asarray(Image.open(out / r["crop_path"])), r) for r in rows
    }


def box(x1, y1, x2, y2, **kw) -> Shape:
    return Shape("cell", "rectangle", (x1, y1, x2, y2), **kw)


def region(row) -> tuple[int, int, int, int]:
    return tuple(int(row[k]) for k in ("x1", "y1", "x2", "y2"))


def test_boxes_inside_and_at_the_edges_are_cut_exactly(tmp_path, source):
    _, rgb = source
    shapes = [box(10, 20, 30, 50), box(0, 0, 5, 7), box(150, 100, 160, 120), box(0, 0, W, H)]
    shapes.append(box(10.4, 20.6, 29.5, 40.2))  # fractional: every touched pixel is kept
    got = crop(tmp_path, source, shapes)
    assert np.array_equal(got[0][0], rgb[20:50, 10:30])
    assert np.array_equal(got[1][0], rgb[0:7, 0:5])
    assert np.array_equal(got[2][0], rgb[100:120, 150:160])
    assert np.array_equal(got[3][0], rgb)
    assert np.array_equal(got[4][0], rgb[20:41, 10:30])
    assert region(got[4][1]) == (10, 20, 30, 41)
    assert (got[0][1]["width"], got[0][1]["height"]) == ("20", "30")


def test_partly_outside_is_clipped_or_padded(tmp_path, source):
    _, rgb = source
    shapes = [box(-10, -5, 20, 15), box(150, 110, 175, 130)]
    clipped = crop(tmp_path / "clip", source, shapes, padding=0)
    assert np.array_equal(clipped[0][0], rgb[0:15, 0:20])
    assert region(clipped[0][1]) == (0, 0, 20, 15)
    assert np.array_equal(clipped[1][0], rgb[110:120, 150:160])

    padded = crop(tmp_path / "pad", source, shapes, border="pad", pad_color=GREY)
    pixels, row = padded[0]
    assert region(row) == (-10, -5, 20, 15) and pixels.shape == (20, 30, 3)
    assert np.array_equal(pixels[5:, 10:], rgb[0:15, 0:20])
    assert (pixels[:5] == GREY).all() and (pixels[:, :10] == GREY).all()
    pixels, row = padded[1]
    assert pixels.shape == (20, 25, 3)
    assert np.array_equal(pixels[:10, :10], rgb[110:120, 150:160])
    assert (pixels[10:] == GREY).all() and (pixels[:, 10:] == GREY).all()


def test_padding_in_pixels_and_as_a_fraction(tmp_path, source):
    _, rgb = source
    got = crop(tmp_path / "px", source, [box(40, 30, 60, 70)], padding=5)
    assert np.array_equal(got[0][0], rgb[25:75, 35:65])
    got = crop(tmp_path / "frac", source, [box(40, 30, 60, 70)], padding_frac=0.25)
    assert region(got[0][1]) == (35, 20, 65, 80)
    assert np.array_equal(got[0][0], rgb[20:80, 35:65])


def test_square_crops_widen_the_short_side_without_stretching(tmp_path, source):
    _, rgb = source
    got = crop(tmp_path / "sq", source, [box(40, 30, 60, 71), box(40, 2, 70, 12)], square=True)
    assert region(got[0][1]) == (30, 30, 71, 71)  # 41 px: the odd pixel goes after
    assert np.array_equal(got[0][0], rgb[30:71, 30:71])
    # near the top edge the square slides inside the image instead of being clipped
    assert region(got[1][1]) == (40, 0, 70, 30)
    assert np.array_equal(got[1][0], rgb[0:30, 40:70])

    got = crop(tmp_path / "pad", source, [box(-4, 0, 6, 20)], square=True, border="pad")
    pixels, row = got[0]
    assert region(row) == (-9, 0, 11, 20)
    assert np.array_equal(pixels[:, 9:], rgb[0:20, 0:11]) and (pixels[:, :9] == 0).all()


def turned_back(rgb, rotation, centre, fill=(0, 0, 0)) -> np.ndarray:
    """The reference: the whole image rotated back with PIL."""
    img = Image.fromarray(rgb).rotate(
        rotation, resample=Image.Resampling.BILINEAR, center=centre, fillcolor=fill
    )
    return np.asarray(img)


@pytest.mark.parametrize("rotation", [30.0, 90.0, 137.5, 200.0, 333.0])
def test_rotated_boxes_are_cut_upright(tmp_path, source, rotation):
    _, rgb = source
    upright = (60.0, 40.0, 100.0, 60.0)
    envelope = rotated_envelope(*upright, rotation)
    got = crop(tmp_path, source, [box(*envelope, rotation=rotation)], padding=2)
    pixels, row = got[0]
    assert region(row) == (58, 38, 102, 62) and float(row["rotation"]) == rotation
    expected = turned_back(rgb, rotation, (80.0, 50.0))[38:62, 58:102]
    assert np.array_equal(pixels, expected)


def test_rotated_box_reaching_past_the_border_is_filled(tmp_path, source):
    """At 90 degrees bilinear sampling hits pixel centres: a padded canvas is a fair reference."""
    _, rgb = source
    # upright (-6, 30, 14, 40), centre (4, 35); turned 90 it spans x -1..9, y 25..45. Past the
    # border only the outline (here the four corners) still tells the box.
    corners = [9.0, 25.0, 9.0, 45.0, -1.0, 45.0, -1.0, 25.0]
    shape = box(0.0, 25.0, 9.0, 45.0, rotation=90.0, polygons=[corners])
    got = crop(tmp_path, source, [shape], pad_color=GREY)
    pixels, row = got[0]
    assert region(row) == (-6, 30, 14, 40)
    canvas = np.empty((H + 40, W + 40, 3), dtype=np.uint8)
    canvas[:] = GREY
    canvas[20:-20, 20:-20] = rgb
    expected = turned_back(canvas, 90.0, (24.0, 55.0), GREY)[50:60, 14:34]
    assert np.array_equal(pixels, expected)
    assert (pixels[-1] == GREY).all() and not (pixels[:-1] == GREY).all(axis=-1).all(axis=-1).any()


def test_rotation_turns_clockwise_boxes_upright(tmp_path):
    """A white rectangle drawn turned clockwise (CVAT's convention) comes out as a white crop."""
    cx, cy, t = 80.0, 60.0, math.radians(35.0)
    corners = np.array([[-25, -10], [25, -10], [25, 10], [-25, 10]], dtype=float)
    turned = np.stack(
        [cx + corners[:, 0] * math.cos(t) - corners[:, 1] * math.sin(t),
         cy + corners[:, 0] * math.sin(t) + corners[:, 1] * math.cos(t)], axis=1
    )  # fmt: skip
    img = Image.new("RGB", (W, H))
    ImageDraw.Draw(img).polygon([tuple(p) for p in turned], fill=(255, 255, 255))
    path = tmp_path / "turned.png"
    img.save(path)
    shape = box(*rotated_envelope(55, 50, 105, 70, 35.0), rotation=35.0)
    got = crop(tmp_path, (path, None), [shape])
    pixels = got[0][0]
    assert pixels.shape == (20, 50, 3)
    assert pixels[1:-1, 1:-1].min() == 255  # wholly inside the object (edges are anti-aliased)


def test_upright_box_is_recovered_from_envelope_and_outline():
    for rotation in (10.0, 44.0, 46.0, 91.0, 170.0, 271.5):
        env = rotated_envelope(10, 20, 50, 36, rotation)
        got, rot = upright_box(Shape("a", "rectangle", env, rotation), (W, H))
        assert rot == rotation and np.allclose(got, (10, 20, 50, 36), atol=1e-6)
    ring = ellipse_polygon(50, 40, 20, 8, 45.0)
    got, _ = upright_box(Shape("a", "ellipse", (0, 0, 1, 1), 45.0, polygons=[ring]), (W, H))
    assert np.allclose(got, (30, 32, 70, 48), atol=1e-6)
    clipped = Shape("a", "rectangle", (0.0, 10.0, 30.0, 40.0), 30.0)  # envelope cut by the border
    assert upright_box(clipped, (W, H)) == ((0.0, 10.0, 30.0, 40.0), 0.0)


def test_mask_alpha_follows_polygons_masks_and_boxes(tmp_path, source):
    _, rgb = source
    ring = [20.0, 20.0, 50.0, 25.0, 30.0, 50.0]
    polygon = Shape("cell", "polygon", (20, 20, 50, 50), polygons=[ring])
    bitmap = np.random.default_rng(1).random((10, 12)) > 0.5
    mask = Shape("cell", "mask", (70, 60, 82, 70), mask=bitmap, mask_origin=(70, 60))
    got = crop(tmp_path, source, [polygon, mask, box(100, 10, 110, 20)], mask_alpha=True, padding=3)
    pixels, row = got[0]
    x1, y1, x2, y2 = region(row)
    assert pixels.shape[2] == 4 and np.array_equal(pixels[..., :3], rgb[y1:y2, x1:x2])
    assert np.array_equal(pixels[..., 3] > 0, polygon.to_mask(W, H)[y1:y2, x1:x2])
    pixels, row = got[1]
    assert np.array_equal(pixels[3:-3, 3:-3, 3] > 0, bitmap) and not pixels[:3, :, 3].any()
    pixels, _ = got[2]
    assert (pixels[3:-3, 3:-3, 3] == 255).all() and pixels[..., 3].sum() == 255 * 100


def test_small_objects_and_objects_outside_the_image_are_skipped(tmp_path, source):
    shapes = [box(10, 10, 14, 40), box(50, 50, 80, 80), box(200, 10, 220, 30)]
    got = crop(tmp_path, source, shapes, min_size=5)
    assert sorted(got) == [1]
