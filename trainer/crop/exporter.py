"""The crop exporter: every annotated or detected object as its own image file, plus metadata.csv.

Layout ``OUT/<label>/<subset>/<image-stem>__<object-id>.<ext>`` (``OUT/<label>/...`` without
subsets) works as a torchvision ``ImageFolder`` root. Each source image is decoded once and all of
its crops are cut from that array. Images are spread over worker threads (for detections the model
runs in the calling thread between decoding and writing), with a few images per worker in flight
and crops planned only as workers need them, so memory stays flat however large the export is.
The set is staged and published whole (see :mod:`trainer.crop.output`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from tqdm import tqdm

from serverless.errors import UserError
from serverless.imageio import ImageDecodeError, read_image
from trainer.crop.geometry import CropSpec, plan_region, upright_box
from trainer.crop.output import CropOutput
from trainer.crop.paths import image_stems, unique_names
from trainer.crop.worker import SAVE_FORMATS, CropJob, CropObject, cut_image, write_crops
from trainer.data.records import DetectionData, ImageRecord, Shape
from trainer.inference import ordered

if TYPE_CHECKING:
    from serverless.detector import Detections, Detector

#: Subset (and folder) of crops cut from a model's detections.
DETECTIONS_SUBSET = "detections"
# CropSummary.skipped reasons, printed after their count.
SMALL = "objects smaller than --min-size"
OUTSIDE = "objects entirely outside their image"
MISSING = "objects in missing images (--skip-missing)"
UNREADABLE = "unreadable image files"
# CropSummary.notes: objects cut, but not as asked.
AT_BORDER = "rotated boxes at the image border cut along their upright envelope"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class CropOptions:
    """Everything about a crop run except its source."""

    spec: CropSpec = field(default_factory=CropSpec)
    fmt: str = "png"  # "png", or "source" to keep each source image's format
    subsets: bool = True  # OUT/<label>/<subset>/...; False: OUT/<label>/...
    workers: int = 1  # threads decoding, cutting and writing beside the calling thread
    append: bool = False
    skip_missing: bool = False
    progress: bool = True


@dataclass
class CropSummary:
    """What a run wrote and what it left out (and why)."""

    out: Path
    images: int = 0
    crops: Counter = field(default_factory=Counter)  # label -> crops written
    skipped: Counter = field(default_factory=Counter)  # reason -> objects
    notes: Counter = field(default_factory=Counter)  # note -> objects
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.crops.values())


# ---------------------------------------------------------------- planning


class _Planner:
    """Turns an image's objects into a :class:`CropJob`: regions, file names, skip counts."""

    def __init__(
        self,
        labels: Sequence[str],
        subsets: Sequence[str],
        options: CropOptions,
        output: CropOutput,
        summary: CropSummary,
    ) -> None:
        self.label_dirs = unique_names(labels)
        self.subset_dirs = unique_names(subsets)
        self.options = options
        self.output = output
        self.summary = summary
        self._made: set[str] = set()  # folders created so far: only folders that get crops exist

    def folder(self, label: str, subset: str) -> str:
        if not self.options.subsets:
            return self.label_dirs[label]
        return f"{self.label_dirs[label]}/{self.subset_dirs[subset]}"

    def suffix(self, source: Path) -> str:
        if self.options.fmt == "png" or self.options.spec.mask_alpha:
            return ".png"
        suffix = source.suffix.lower()
        return suffix if suffix in SAVE_FORMATS else ".png"

    def job(
        self,
        image: ImageRecord,
        stem: str,
        size: tuple[int, int],
        objects: Iterable[tuple[Shape, int, float | None]],
    ) -> CropJob:
        spec, suffix = self.options.spec, self.suffix(image.path)
        planned, skipped = [], 0
        for shape, object_id, score in objects:
            box, rotation = upright_box(shape, size)
            if shape.rotation % 360 and not rotation:
                self.summary.notes[AT_BORDER] += 1
            region = plan_region(box, rotation, spec, size)
            too_small = min(box[2] - box[0], box[3] - box[1]) < spec.min_size
            if too_small or region is None:
                self.summary.skipped[SMALL if too_small else OUTSIDE] += 1
                skipped += 1
                continue
            folder = self.folder(shape.label, image.subset)
            if folder not in self._made:
                self.output.make_dir(folder)
                self._made.add(folder)
            path = f"{folder}/{stem}__{object_id}{suffix}"
            self.output.claim(path, image.identity)
            planned.append(CropObject(shape, object_id, path, box, region, score))
        return CropJob(
            image.path, image.name, image.subset, size, planned, image.task_id, image.frame, skipped
        )


def _annotation_jobs(
    data: DetectionData,
    options: CropOptions,
    output: CropOutput,
    summary: CropSummary,
    labels: Sequence[str] | None,
) -> tuple[int, Iterator[CropJob]]:
    """(objects selected, their jobs): one job per image, planned only when a worker needs it so
    that memory does not grow with the export; missing images are an error up front."""
    wanted = check_labels(labels, data.labels, data.not_classes)
    chosen = [im for im in data.images if any(_selected(im, wanted))]
    chosen = _drop_missing(chosen, wanted, options.skip_missing, summary)
    all_labels = list(data.labels) + sorted({s.label for im in chosen for s in im.shapes})
    subsets = list(dict.fromkeys(im.subset for im in chosen))
    planner = _Planner(all_labels, subsets, options, output, summary)
    stems = image_stems([im.key for im in chosen], options.subsets, [im.identity for im in chosen])
    total = sum(1 for im in chosen for _ in _selected(im, wanted))
    jobs = (
        planner.job(im, stem, (im.width, im.height), _selected(im, wanted))
        for im, stem in zip(chosen, stems, strict=True)
    )
    return total, jobs


def _selected(image: ImageRecord, wanted: set[str] | None) -> Iterator[tuple[Shape, int, None]]:
    """(shape, object id, no score) of the image's objects of the wanted labels.

    The id of an object without one is its index among all shapes of its image, so it does not
    change when --labels selects fewer objects.
    """
    for i, shape in enumerate(image.shapes):
        if wanted is None or shape.label in wanted:
            yield shape, i if shape.object_id is None else shape.object_id, None


def check_labels(
    labels: Sequence[str] | None, known: Sequence[str], not_classes: dict[str, str] | None = None
) -> set[str] | None:
    """The selected labels as a set (None: all); a name not in ``known`` is an error (saying why
    when it is a label of the data that holds no objects)."""
    if not labels:
        return None
    for name in labels:
        if name not in known and name in (not_classes or {}):
            raise UserError(f"--labels: label {name!r} holds no objects to crop: {not_classes[name]}")
    unknown = [name for name in labels if name not in known]
    if unknown:
        raise UserError(
            f"--labels: unknown label(s) {', '.join(map(repr, unknown))}; "
            f"the labels are {', '.join(map(repr, known))}"
        )
    return set(labels)


def _drop_missing(
    chosen: list[ImageRecord], wanted: set[str] | None, skip_missing: bool, summary: CropSummary
) -> list[ImageRecord]:
    missing = [im for im in chosen if im.path is None or not im.path.is_file()]
    if not missing:
        return chosen
    if not skip_missing:
        first = missing[0]
        raise UserError(
            f"{len(missing)} of {len(chosen)} images with objects to crop are missing (first: "
            f"{first.identity} at {first.path or 'no path in the export'}); point "
            "--images-dir at the image folder, or pass --skip-missing to crop the others"
        )
    summary.skipped[MISSING] += sum(1 for im in missing for _ in _selected(im, wanted))
    gone = {id(im) for im in missing}
    return [im for im in chosen if id(im) not in gone]


# ---------------------------------------------------------------- running


@contextmanager
def _executor(workers: int) -> Iterator[ThreadPoolExecutor]:
    """Threads, not processes: decoding, resampling, PNG encoding and file writes release the GIL,
    nothing needs pickling, and it works the same from scripts, notebooks and console scripts."""
    pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="crop")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _record(job: CropJob, output: CropOutput, summary: CropSummary, bar: tqdm) -> None:
    output.write_rows(metadata_row(job, obj) for obj in job.objects)
    summary.images += bool(job.objects)
    summary.crops.update(obj.shape.label for obj in job.objects)
    bar.update(len(job.objects) + job.skipped)


def metadata_row(job: CropJob, obj: CropObject) -> list[str]:
    """One metadata.csv row (columns as :data:`trainer.crop.output.COLUMNS`)."""
    r = obj.region
    return [
        obj.crop_path,
        obj.shape.label,
        job.subset,
        job.source_image,
        "" if job.task_id is None else str(job.task_id),
        "" if job.frame is None else str(job.frame),
        str(obj.object_id),
        *(str(v) for v in (r.x1, r.y1, r.x2, r.y2)),
        "" if obj.score is None else f"{obj.score:.4f}",
        f"{r.rotation:g}",
        str(int(obj.shape.occluded)),
        json.dumps(obj.shape.attributes, ensure_ascii=False, sort_keys=True),
        str(r.width),
        str(r.height),
    ]


def crop_annotations(
    data: DetectionData,
    out: str | Path,
    options: CropOptions = CropOptions(),
    labels: Sequence[str] | None = None,
) -> CropSummary:
    """Write a crop of every annotated object (of ``labels``, default all) to ``out``."""
    start = time.perf_counter()
    summary = CropSummary(Path(out))
    with CropOutput(out, options.append) as output:
        total, jobs = _annotation_jobs(data, options, output, summary, labels)
        depth = 4 * max(options.workers, 1)
        work = partial(cut_image, spec=options.spec, root=str(output.staging), max_pixels=data.max_pixels)
        with (
            _executor(options.workers) as pool,
            tqdm(total=total, unit="obj", disable=not options.progress or None) as bar,
        ):
            for job, _ in ordered(work, jobs, depth, pool):
                _record(job, output, summary, bar)
        output.commit()
    summary.seconds = time.perf_counter() - start
    return summary


def crop_detections(
    detector: Detector,
    images_dir: str | Path,
    out: str | Path,
    options: CropOptions = CropOptions(),
    threshold: float | None = None,
    labels: Sequence[str] | None = None,
) -> CropSummary:
    """Run ``detector`` on every image under ``images_dir`` and write a crop of each detection.

    Crops go to subset ``detections``; their file names flatten each image's path relative to
    ``images_dir``. Unreadable files are skipped and counted.
    """
    from trainer.inference import detect_each, find_images

    start = time.perf_counter()
    root, summary = Path(images_dir), CropSummary(Path(out))
    paths = find_images(root, exclude=Path(out))
    if not paths:
        raise UserError(f"--images {root}: no image files (jpg, png, tif, bmp) found")
    wanted = check_labels(labels, detector.labels)
    records = [
        ImageRecord(DETECTIONS_SUBSET, p.relative_to(root).as_posix(), 0, 0, p) for p in paths
    ]
    stems = image_stems([r.key for r in records], by_subset=True)
    with CropOutput(out, options.append) as output:
        planner = _Planner(detector.labels, [DETECTIONS_SUBSET], options, output, summary)
        write = partial(_write_item, spec=options.spec, root=str(output.staging))
        with (
            _executor(options.workers) as pool,
            tqdm(unit="obj", disable=not options.progress or None) as bar,
        ):
            depth = 2 * max(options.workers, 1)
            detected = detect_each(detector, zip(records, stems, strict=True),
                                   lambda item: read_image(item[0].path), threshold, depth=depth, pool=pool)
            planned = _plan_detections(detected, planner, wanted)
            for (_, job), _ in ordered(write, planned, depth, pool):
                _record(job, output, summary, bar)
                bar.set_postfix_str(f"{summary.images}/{len(paths)} images")
        output.commit()
    summary.seconds = time.perf_counter() - start
    return summary


def _plan_detections(
    detected: Iterable[tuple[tuple[ImageRecord, str], np.ndarray | ImageDecodeError, Detections | None]],
    planner: _Planner,
    wanted: set[str] | None,
) -> Iterator[tuple[np.ndarray, CropJob]]:
    """Plan the crops of each image's detections; unreadable images are counted."""
    for (record, stem), rgb, det in detected:
        if det is None:
            planner.summary.skipped[UNREADABLE] += 1
            continue
        yield rgb, planner.job(record, stem, (rgb.shape[1], rgb.shape[0]), _detected(det, wanted))


def _write_item(item: tuple[np.ndarray, CropJob], spec: CropSpec, root: str) -> None:
    write_crops(item[0], item[1], spec, root)


def _detected(
    det: Detections, wanted: set[str] | None
) -> Iterator[tuple[Shape, int, float | None]]:
    """(shape, object id, score) per kept detection; the id is its rank in the image."""
    for i, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels, strict=True)):
        if wanted is not None and label not in wanted:
            continue
        shape = Shape(label, "rectangle", tuple(float(v) for v in box))
        if det.masks:
            shape.kind, shape.mask = "mask", det.masks[i]
            shape.mask_origin = det.mask_boxes[i][:2]
        yield shape, i, float(score)
