"""Image decoding shared by training and the Nuclio function (train/serve parity).

Every frame CVAT can hold (JPEG/PNG/TIFF/BMP, RGBA, palette, grayscale, 16-bit, EXIF-rotated) becomes
the same 8-bit RGB array whether it is read from an export during training or arrives base64-encoded
in a request. An image that trains as X is served as X.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serverless.errors import ImageDecodeError

#: Largest frame accepted by default, in pixels (16384 x 16384): larger is refused before decoding.
MAX_PIXELS = 268_435_456
#: The environment variable that sets the limit (the trainer's --max-pixels sets it per command).
MAX_PIXELS_ENV = "CVAT_DETECTOR_MAX_PIXELS"
# The pixel limit is ours alone, checked from the header before anything is decoded. Pillow's own
# decompression-bomb limits (a warning above 89 MP, an error above 179 MP at open) would otherwise
# refuse, or trace back on, whole-slide images the user has allowed.
Image.MAX_IMAGE_PIXELS = None


def pixel_limit(value: int | None = None) -> int:
    """The pixel limit in force: ``value`` when given, else $CVAT_DETECTOR_MAX_PIXELS, else
    :data:`MAX_PIXELS`. Raises ValueError naming the variable when it is not a positive integer."""
    if value is not None:
        return value
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"environment variable {MAX_PIXELS_ENV}: expected a positive integer, got {raw!r}")
    return limit


def over_limit_message(source: str, width: int, height: int, limit: int) -> str:
    """One line naming the image, its size, the limit and how to raise it."""
    return (
        f"{source}: {width}x{height} = {width * height} pixels, over the limit of {limit} "
        f"pixels; to allow it, pass --max-pixels {width * height} or set {MAX_PIXELS_ENV}={width * height}"
    )


def decode_image(data: bytes, source: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 RGB array, EXIF orientation applied.

    Images over ``max_pixels`` (default: :func:`pixel_limit`) are refused from their header,
    before any pixel is decoded.
    """
    limit = pixel_limit(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(img, source, limit)
            ImageOps.exif_transpose(img, in_place=True)  # not in place, it copies an upright frame
            return to_rgb8(img)
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(f"{source}: not enough memory to decode the image") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{source}: not a readable image (expected JPEG, PNG, TIFF or BMP bytes, "
            f"got bytes starting {data[:8]!r})"
        ) from exc
    except Exception as exc:  # PIL raises many types for truncated or corrupt data
        raise ImageDecodeError(f"{source}: not a readable image (truncated or corrupt: {exc})") from exc


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file with :func:`decode_image`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read image file: {exc.strerror}") from exc
    return decode_image(data, source=str(path), max_pixels=max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as CVAT reports it: after EXIF orientation, without decoding pixels.

    A PNG's ``getexif`` decodes the whole image to look for an eXIf chunk after the pixel data
    (minutes for a whole slide), so a PNG's EXIF is taken from the chunks before them only.
    """
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "PNG":
            exif = Image.Exif()
            if "exif" in img.info:
                exif.load(img.info["exif"])
        else:
            exif = img.getexif()
        orientation = exif.get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_size(img: Image.Image, source: str, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(over_limit_message(source, w, h, max_pixels))


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to HxWx3 uint8 RGB; high bit depths are scaled, not clipped."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return _gray_to_rgb(_scale_to_u8(arr, 65535.0 if mode.startswith("I;16") else None))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _scale_to_u8(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map a high-bit-depth gray image to 0..255: by the format's range, or its own if unknown."""
    if full_scale is None:
        lo, hi = float(arr.min()), float(arr.max())
        full_scale = hi if lo >= 0 and hi > 255 else max(hi - lo, 1.0)
        arr = arr - (0 if lo >= 0 and hi > 255 else lo)
    return np.clip(arr * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)
