"""Decoding pinned to pixels computed without the decoder: hand-built arrays, written by Pillow's
encoders, expected values from numpy and the formulas the decoder documents (serverless/imageio.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serverless.imageio import decode_image, image_size, read_image

#: Every 16-bit value once: a 256x256 ramp 0, 1, ..., 65535.
RAMP16 = np.arange(65536, dtype=np.uint32).reshape(256, 256)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gray(rgb: np.ndarray) -> np.ndarray:
    """The gray channel of a decoded gray image, after checking the three channels are equal."""
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0]


def _scaled16(values: np.ndarray) -> np.ndarray:
    """16-bit to 8-bit as the decoder promises (scaled by the full 16-bit range, rounded, never
    clipped): floor(v * 255 / 65535 + 1/2), in integers."""
    return ((values.astype(np.int64) * 510 + 65535) // 131070).astype(np.uint8)


def test_the_expected_16_bit_scale_is_the_rounded_ratio():
    """The hand formula itself, on values whose answers are obvious."""
    assert _scaled16(np.array([0, 128, 129, 257, 32767, 32896, 65535])).tolist() == [
        0, 0, 1, 1, 127, 128, 255,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")],
    ids=["png-I;16", "tiff-I;16", "tiff-I;16B"],
)
def test_16_bit_gray_keeps_its_precision(fmt, dtype):
    img = Image.fromarray(RAMP16.astype(dtype))
    assert img.mode in ("I;16", "I;16B")  # really 16 bits per pixel in the file
    rgb = decode_image(_encoded(img, fmt))
    assert rgb.shape == (256, 256, 3)
    gray = _gray(rgb)
    expected = _scaled16(RAMP16)
    assert np.array_equal(gray, expected), np.argwhere(gray != expected)[:5].tolist()
    # every 8-bit level is reached, each by 257 input values (129 at either end)
    assert np.bincount(gray.ravel(), minlength=256).tolist() == [129] + [257] * 254 + [129]


def test_16_bit_tiff_read_from_a_file(tmp_path: Path):
    values = np.array([[0, 1000, 20000], [40000, 60000, 65535]], dtype=np.uint16)
    path = tmp_path / "frame.tif"
    Image.fromarray(values).save(path)
    assert _gray(read_image(path)).tolist() == [[0, 4, 78], [156, 233, 255]]  # round(v / 257)


PALETTE = [(200, 30, 40), (10, 220, 60), (0, 0, 255), (90, 90, 90)]


def _palette_image(transparency: int | bytes) -> bytes:
    indices = np.array([[0, 1, 2, 3]] * 2, dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return _encoded(img, "PNG", transparency=transparency)


def test_palette_with_a_transparent_index_is_white_there():
    rgb = decode_image(_palette_image(transparency=1))  # tRNS: index 1 fully transparent
    assert rgb[0].tolist() == [[200, 30, 40], [255, 255, 255], [0, 0, 255], [90, 90, 90]]
    assert np.array_equal(rgb[0], rgb[1])


def test_palette_with_alpha_per_entry_is_composited_on_white():
    alphas = [255, 0, 128, 64]
    rgb = decode_image(_palette_image(transparency=bytes(alphas))).astype(int)
    for i, (color, alpha) in enumerate(zip(PALETTE, alphas, strict=True)):
        # over opaque white: c * a + 255 * (1 - a), a in [0, 1]
        expected = [round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in color]
        assert np.abs(rgb[0, i] - expected).max() <= 1, (i, rgb[0, i].tolist(), expected)
    assert rgb[0, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [200, 30, 40]


def test_rgba_is_composited_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 51]]], dtype=np.uint8)
    rgb = decode_image(_encoded(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    assert rgb[0, :2].tolist() == [[10, 20, 30], [255, 255, 255]]
    assert np.abs(rgb[0, 2] - [244, 224, 204]).max() <= 1  # 0.2 * c + 0.8 * 255


#: (C, M, Y, K) blocks and the RGB each one is: R = (255 - C) * (255 - K) / 255, and so on.
CMYK = [((255, 0, 0, 0), (0, 255, 255)), ((0, 128, 255, 64), (191, 95, 0)), ((0, 0, 0, 255), (0, 0, 0)),
        ((40, 200, 90, 10), (207, 53, 159)), ((0, 0, 0, 0), (255, 255, 255))]


def test_cmyk_jpeg_becomes_rgb_by_the_subtractive_formula():
    cmyk = np.zeros((16, 16 * len(CMYK), 4), dtype=np.uint8)
    for i, (value, rgb) in enumerate(CMYK):
        cmyk[:, 16 * i : 16 * (i + 1)] = value
        expected = [round((255 - c) * (255 - value[3]) / 255) for c in value[:3]]
        assert list(rgb) == expected  # the table above is the formula
    data = _encoded(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK"
    decoded = decode_image(data).astype(int)
    assert decoded.shape == (16, 16 * len(CMYK), 3)
    for i, (_, rgb) in enumerate(CMYK):
        block = decoded[4:12, 16 * i + 4 : 16 * i + 12]
        assert np.abs(block - rgb).max() <= 2, (i, block[0, 0].tolist(), rgb)


def _asymmetric(h: int, w: int, cell: int) -> np.ndarray:
    """An h x w grid of cells, each a different colour: every flip and rotation looks different."""
    rows, cols = h // cell, w // cell
    k = np.arange(rows * cols).reshape(rows, cols)
    colors = np.stack([k * 37 % 256, k * 91 % 256, 255 - k * 53 % 256], axis=-1).astype(np.uint8)
    return np.repeat(np.repeat(colors, cell, axis=0), cell, axis=1)


#: EXIF 2.32, tag 0x0112 (Orientation): the stored pixels turned into what a viewer displays.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed: stored rows are displayed columns
    6: lambda a: np.rot90(a, k=-1),  # stored needs 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, k=1),  # stored needs 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_every_exif_orientation_is_displayed_as_the_spec_says(fmt, orientation, tmp_path):
    stored = _asymmetric(24, 40, 8)  # 3 x 5 cells: 40 wide, 24 high as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    data = _encoded(Image.fromarray(stored), fmt, exif=exif, **kw)
    expected = DISPLAYED[orientation](stored)
    decoded = decode_image(data)
    assert decoded.shape == expected.shape
    tolerance = 0 if fmt == "PNG" else 3
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance
    path = tmp_path / f"frame.{fmt.lower()}"
    path.write_bytes(data)
    assert image_size(path) == (expected.shape[1], expected.shape[0])  # (width, height) CVAT shows
