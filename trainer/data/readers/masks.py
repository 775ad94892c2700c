"""Mask run-length encodings of CVAT XML and COCO exports, decoded exactly."""

from __future__ import annotations

import numpy as np


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

    Raises ValueError when the RLE's size is not the image's or its runs do not cover it.
    """
    full = np.zeros((height, width), dtype=bool)
    window = coco_rle_window(segmentation, width, height)
    if window is not None:
        bitmap, left = window
        full[:, left : left + bitmap.shape[1]] = bitmap
    return full


def coco_rle_window(segmentation: dict, width: int, height: int) -> tuple[np.ndarray, int] | None:
    """(bitmap of the columns holding set pixels, its first column), or None when none is set.

    CVAT's COCO export writes every mask as an RLE of the whole image: decoding each one in full
    would cost the whole slide per object, so only the columns the runs touch are built.
    """
    size = [int(v) for v in segmentation.get("size", [])]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} is not the image's [height, width] [{height}, {width}]")
    counts = segmentation.get("counts")
    if isinstance(counts, (str, bytes)):
        counts = _counts_from_string(counts.encode("ascii") if isinstance(counts, str) else counts)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs.size and runs.min() < 0) or int(runs.sum()) != width * height:
        raise ValueError(f"RLE counts cover {int(runs.sum()) if runs.ndim == 1 else '?'} pixels, "
                         f"expected {width * height} (column-major, non-negative runs)")  # fmt: skip
    ends = np.cumsum(runs)
    starts, stops = (ends - runs)[1::2], ends[1::2]  # the runs of ones
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if not starts.size:
        return None
    first, last = int(starts[0]) // height, (int(stops[-1]) - 1) // height
    edges = np.zeros((last - first + 1) * height + 1, dtype=np.int32)
    np.add.at(edges, starts - first * height, 1)
    np.add.at(edges, stops - first * height, -1)
    band = np.cumsum(edges[:-1]) > 0
    return band.reshape(last - first + 1, height).T, first


def _counts_from_string(text: bytes) -> list[int]:
    """pycocotools' compressed counts (``rleFrString``): 5-bit groups as characters from '0',
    a continuation bit, sign extension, and each count after the second stored as a difference."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("compressed RLE counts end in the middle of a number")
            c = text[pos] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
