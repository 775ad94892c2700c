"""Mask run-length encodings of CVAT XML and COCO exports, decoded exactly."""

from __future__ import annotations

import numpy as np
from faster_coco_eval.core import mask as mask_utils


def decode_cvat_rle(counts: list[int], width: int, height: int) -> np.ndarray:
    """CVAT's ``<mask rle>``: runs alternating 0 and 1 (starting with 0), row-major, width x height.

    Raises ValueError when the runs do not cover the bitmap exactly.
    """
    runs = np.asarray(counts, dtype=np.int64)
    if runs.size and runs.min() < 0:
        raise ValueError("rle has a negative run length")
    if int(runs.sum()) != width * height:
        raise ValueError(f"rle covers {int(runs.sum())} pixels, expected {width}x{height}")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(height, width)


def parse_cvat_rle(text: str) -> list[int]:
    """The ``rle`` attribute as CVAT writes it: "3, 5, 2"."""
    return [int(v) for v in text.split(",")] if text.strip() else []


def decode_coco_rle(segmentation: dict, width: int, height: int) -> np.ndarray:
    """COCO RLE (uncompressed counts list or compressed string) to an HxW bool mask.

    Raises ValueError when the RLE's size is not the image's.
    """
    size = [int(v) for v in segmentation.get("size", [])]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} is not the image's [height, width] [{height}, {width}]")
    counts = segmentation.get("counts")
    if isinstance(counts, list) and sum(counts) != width * height:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, expected {width * height}")
    try:
        if isinstance(counts, (str, bytes)):  # compressed (LEB128-like text)
            text = counts.encode("ascii") if isinstance(counts, str) else counts
            rle = {"counts": text, "size": size}
        else:
            rle = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(rle).astype(bool)
    except (RuntimeError, TypeError, UnicodeError) as exc:  # the C++ decoder's errors
        raise ValueError(f"invalid RLE segmentation ({exc})") from exc
