"""Where a crop is cut and how its pixels are produced: padding, squaring, borders, rotation, alpha.

Coordinates are CVAT's: continuous pixels, the top-left pixel spans [0, 1). A box covers every pixel
it touches. A rotated box is CVAT's: the box ``(x1, y1, x2, y2)`` turned clockwise by ``rotation``
degrees about its centre; its crop is cut upright, exactly as if the image had been turned back with
``PIL.Image.rotate(rotation, center=centre)`` and then cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.records import Shape, rasterize

#: Tolerance when rounding box edges to whole pixels (exports write 2 decimals; float32 noise).
_EPS = 1e-3
#: Extra source pixels around a rotated crop's footprint so bilinear sampling sees real neighbours.
_MARGIN = 2


@dataclass(frozen=True)
class CropSpec:
    """How every crop of a run is cut (the command-line options, validated)."""

    padding: float = 0.0  # pixels added on every side
    padding_frac: float = 0.0  # fraction of the box's width (left/right) and height (top/bottom)
    square: bool = False
    border: str = "clip"  # "clip" to the image, or "pad" with pad_color
    pad_color: tuple[int, int, int] = (0, 0, 0)
    min_size: float = 0.0  # objects whose shorter side is smaller are skipped
    mask_alpha: bool = False


@dataclass(frozen=True)
class Region:
    """The cut, in source pixels (in the upright frame when ``rotation`` is set); end exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int
    rotation: float = 0.0
    centre: tuple[float, float] = (0.0, 0.0)  # rotation centre (the box centre)

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


def upright_box(
    shape: Shape, image_size: tuple[int, int]
) -> tuple[tuple[float, float, float, float], float]:
    """(box, rotation): the shape's box before CVAT turned it, and the clockwise angle in degrees.

    ``Shape.box`` of a rotated shape is its axis-aligned envelope. The upright box is recovered from
    the outline when the shape has one (exact for any angle), otherwise from the envelope. An
    envelope touching the image border may have been clipped and no longer determines the box:
    such a shape is cut along its envelope, unrotated (rotation 0 is returned).
    """
    rotation = shape.rotation % 360.0
    if rotation == 0.0:
        return shape.box, 0.0
    if shape.polygons:
        points = np.concatenate([np.asarray(r, dtype=np.float64) for r in shape.polygons])
        xy = points.reshape(-1, 2)
        centre = (xy.min(axis=0) + xy.max(axis=0)) / 2
        upright = _unrotate(xy, centre, rotation)
        (x1, y1), (x2, y2) = upright.min(axis=0), upright.max(axis=0)
        return (float(x1), float(y1), float(x2), float(y2)), rotation
    x1, y1, x2, y2 = shape.box
    width, height = image_size
    if x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height:
        return shape.box, 0.0
    return _box_from_envelope(shape.box, rotation), rotation


def _unrotate(xy: np.ndarray, centre: np.ndarray, rotation: float) -> np.ndarray:
    """Turn points counter-clockwise by ``rotation`` degrees about ``centre`` (undo CVAT's turn)."""
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    d = xy - centre
    return np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c], axis=1) + centre


def _box_from_envelope(
    box: tuple[float, float, float, float], rotation: float
) -> tuple[float, float, float, float]:
    """Invert ``W = w|cos| + h|sin|, H = w|sin| + h|cos|`` about the envelope's centre.

    Exact for an envelope computed from the box (the readers do so in double precision); at 45
    degrees every w + h = const fits and the box is taken as the square with that envelope.
    """
    x1, y1, x2, y2 = box
    big_w, big_h = x2 - x1, y2 - y1
    c, s = abs(math.cos(math.radians(rotation))), abs(math.sin(math.radians(rotation)))
    det = c * c - s * s
    if abs(det) < 1e-9:
        w = h = (big_w + big_h) / 2 / (c + s)
    else:
        w = max((big_w * c - big_h * s) / det, 0.0)
        h = max((big_h * c - big_w * s) / det, 0.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def plan_region(
    box: tuple[float, float, float, float],
    rotation: float,
    spec: CropSpec,
    image_size: tuple[int, int],
) -> Region | None:
    """The pixel region to cut for ``box`` (upright when rotated), or None if nothing is inside."""
    x1, y1, x2, y2 = box
    pad_x = spec.padding + spec.padding_frac * (x2 - x1)
    pad_y = spec.padding + spec.padding_frac * (y2 - y1)
    ix1, ix2 = _cover(x1 - pad_x, x2 + pad_x)
    iy1, iy2 = _cover(y1 - pad_y, y2 + pad_y)
    if spec.square:
        side = max(ix2 - ix1, iy2 - iy1)
        ix1, ix2 = _grow(ix1, ix2, side)
        iy1, iy2 = _grow(iy1, iy2, side)
    if rotation:
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        return Region(ix1, iy1, ix2, iy2, rotation, centre)
    if spec.border == "pad":
        return Region(ix1, iy1, ix2, iy2)
    width, height = image_size
    if spec.square:
        ix1, ix2 = _shift_inside(ix1, ix2, width)
        iy1, iy2 = _shift_inside(iy1, iy2, height)
    ix1, iy1, ix2, iy2 = max(ix1, 0), max(iy1, 0), min(ix2, width), min(iy2, height)
    if ix2 <= ix1 or iy2 <= iy1:
        return None
    return Region(ix1, iy1, ix2, iy2)


def _cover(lo: float, hi: float) -> tuple[int, int]:
    """Whole pixels touched by [lo, hi); at least one."""
    a, b = math.floor(lo + _EPS), math.ceil(hi - _EPS)
    return a, max(b, a + 1)


def _grow(lo: int, hi: int, side: int) -> tuple[int, int]:
    """Widen [lo, hi) to ``side`` pixels about its centre (the odd pixel goes after)."""
    extra = side - (hi - lo)
    return lo - extra // 2, hi + extra - extra // 2


def _shift_inside(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """Slide [lo, hi) into [0, limit) without changing its size, when it fits."""
    if hi - lo > limit:
        return lo, hi
    shift = max(0, -lo) - max(0, hi - limit)
    return lo + shift, hi + shift


def cut(rgb: np.ndarray, region: Region, pad_color: tuple[int, int, int]) -> np.ndarray:
    """The region's pixels (HxWx3 uint8); outside the image filled with ``pad_color``."""
    if region.rotation:
        return _cut_rotated(rgb, region, pad_color)
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = region.x1, region.y1, region.x2, region.y2
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
        return rgb[y1:y2, x1:x2]
    out = np.empty((y2 - y1, x2 - x1, 3), dtype=np.uint8)
    out[:] = pad_color
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = rgb[sy1:sy2, sx1:sx2]
    return out


def _rotate_matrix(region: Region) -> tuple[float, ...]:
    """PIL's affine for ``Image.rotate(rotation, center=centre)``, shifted to the region's origin.

    Maps crop pixel (u, v) to source (a*u + b*v + c, d*u + e*v + f), as PIL computes it.
    """
    angle = -math.radians(region.rotation)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = region.centre
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return a, b, c + a * region.x1 + b * region.y1, d, e, f + d * region.x1 + e * region.y1


def _cut_rotated(rgb: np.ndarray, region: Region, pad_color: tuple[int, int, int]) -> np.ndarray:
    """Turn back and cut, resampling only the source window under the crop (bilinear)."""
    a, b, c, d, e, f = _rotate_matrix(region)
    w, h = region.width, region.height
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64)
    xs = a * corners[:, 0] + b * corners[:, 1] + c
    ys = d * corners[:, 0] + e * corners[:, 1] + f
    height, width = rgb.shape[:2]
    wx1 = max(math.floor(xs.min()) - _MARGIN, 0)
    wy1 = max(math.floor(ys.min()) - _MARGIN, 0)
    wx2 = min(math.ceil(xs.max()) + _MARGIN, width)
    wy2 = min(math.ceil(ys.max()) + _MARGIN, height)
    if wx2 <= wx1 or wy2 <= wy1:
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = pad_color
        return out
    window = Image.fromarray(np.ascontiguousarray(rgb[wy1:wy2, wx1:wx2]))
    turned = window.transform(
        (w, h),
        Image.Transform.AFFINE,
        (a, b, c - wx1, d, e, f - wy1),
        resample=Image.Resampling.BILINEAR,
        fillcolor=tuple(pad_color),
    )
    return np.asarray(turned)


def alpha(shape: Shape, box: tuple[float, float, float, float], region: Region) -> np.ndarray:
    """The object's outline in the crop as an 8-bit alpha plane (255 inside, 0 outside).

    Masks and polygons give their outline; a box, the pixels it covers. The padding around the
    object and anything outside the image stay transparent.
    """
    canvas = Image.new("L", (region.width, region.height), 0)
    if shape.mask is not None and not region.rotation:
        out = np.asarray(canvas).copy()
        _paste_mask(out, shape.mask, shape.mask_origin, region)
        return out
    if shape.polygons:  # rasterised as COCO does, like the shape's training mask
        rings = [_to_crop(ring, region) for ring in shape.polygons]
        return rasterize(rings, region.width, region.height).astype(np.uint8) * 255
    (bx1, bx2), (by1, by2) = _cover(box[0], box[2]), _cover(box[1], box[3])
    ImageDraw.Draw(canvas).rectangle(
        (bx1 - region.x1, by1 - region.y1, bx2 - 1 - region.x1, by2 - 1 - region.y1), fill=255
    )
    return np.asarray(canvas)


def _paste_mask(
    out: np.ndarray, mask: np.ndarray, origin: tuple[int, int], region: Region
) -> None:
    left, top = origin[0] - region.x1, origin[1] - region.y1
    mh, mw = mask.shape
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + mw, out.shape[1]), min(top + mh, out.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1][mask[y0 - top : y1 - top, x0 - left : x1 - left]] = 255


def _to_crop(ring: list[float], region: Region) -> list[float]:
    """A flat source-pixel ring in crop pixels (turned back first when the crop is rotated)."""
    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if region.rotation:
        xy = _unrotate(xy, np.asarray(region.centre), region.rotation)
    return (xy - [region.x1, region.y1]).ravel().tolist()
