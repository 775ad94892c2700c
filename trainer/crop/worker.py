"""One image's share of the crop exporter, run by worker threads: decode once, cut, encode, write.

What a job holds is planned beforehand (:mod:`trainer.crop.exporter`); here only pixels are touched, and
decoding, resampling, encoding and writing all release the GIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from serverless.imageio import ImageDecodeError, read_image
from trainer.crop.geometry import CropSpec, Region, alpha, cut
from trainer.data.records import Shape

#: Encoder and settings per crop suffix. PNG at zlib level 1: lossless, several times faster to
#: write than the default level for a few percent more bytes.
SAVE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {"compress_level": 1}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".tif": ("TIFF", {"compression": "tiff_lzw"}),
    ".tiff": ("TIFF", {"compression": "tiff_lzw"}),
    ".bmp": ("BMP", {}),
    ".webp": ("WEBP", {"quality": 95}),
}


@dataclass
class CropObject:
    """One crop to cut: the object, where it goes, and the planned region."""

    shape: Shape
    object_id: int
    crop_path: str  # relative to OUT, "/"-separated
    box: tuple[float, float, float, float]  # upright box (before CVAT's rotation)
    region: Region
    score: float | None = None


@dataclass
class CropJob:
    """All crops of one source image: the unit of work handed to a worker."""

    path: Path
    source_image: str  # the export's image name, or the path relative to --images
    subset: str
    size: tuple[int, int]  # (width, height) the regions were planned for
    objects: list[CropObject]
    task_id: int | None = None
    frame: int | None = None
    skipped: int = 0  # objects of this image left out (too small, outside the image)


def cut_image(job: CropJob, spec: CropSpec, root: str, max_pixels: int | None = None) -> None:
    """Decode the image once (refused over ``max_pixels``) and write all of its crops under ``root``."""
    if job.objects:
        write_crops(read_image(job.path, max_pixels), job, spec, root)


def write_crops(rgb: np.ndarray, job: CropJob, spec: CropSpec, root: str) -> None:
    """Cut and encode every crop of ``job`` from the decoded image ``rgb``."""
    height, width = rgb.shape[:2]
    if (width, height) != job.size:
        raise ImageDecodeError(
            f"{job.path}: image is {width}x{height} pixels but its annotations are for "
            f"{job.size[0]}x{job.size[1]}; the crops would be misplaced"
        )
    for obj in job.objects:
        pixels = cut(rgb, obj.region, spec.pad_color)
        if spec.mask_alpha:
            pixels = np.dstack([pixels, alpha(obj.shape, obj.box, obj.region)])
        encoder, params = SAVE_FORMATS[PurePosixPath(obj.crop_path).suffix]
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            Path(root, obj.crop_path), encoder, **params
        )
