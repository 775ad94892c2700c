"""The crops as an EcoTaxa import: ``OUT/ecotaxa_crops.tsv`` beside the crop files.

EcoTaxa (https://ecotaxa.obs-vlfr.fr) imports a folder or zip holding ``ecotaxa*.tsv`` files and
the images they name. The rules followed here are those of its import code (ecotaxa/ecotaxa_back,
``py/BO/Bundle.py`` and ``py/BO/TSVFile.py``, ``py/BO/Mappings.py``):

- tab-separated; line 1 the column names, line 2 their types: ``[t]`` text or ``[f]`` number (only
  ``object_*`` columns keep their type; other tables store text);
- every name is ``<prefix>_<field>`` with prefix ``object``, ``img`` (only ``img_file_name`` and
  ``img_rank``), ``sample``, ``acq`` or ``process``; a prefix used needs its ``<prefix>_id``;
- each line has an ``object_id`` and an ``img_file_name`` relative to the TSV that PIL can open; an
  (object_id, img_file_name) pair appears once;
- ``object_annotation_status`` is ``predicted``, ``validated`` or ``dubious``;
  ``object_annotation_category`` names a taxon (EcoTaxa asks to map unknown names at import);
- the file is read as Latin-1 unless it starts with a UTF-8 BOM: it is written UTF-8 with a BOM.

What goes in: the label as category (a label ending in ``_NV``, not validated, as its base name
with status ``predicted``; detections ``predicted``; annotations ``validated``), the score, the
object's box in source pixels and its size, in µm too when the pixel size is known, the source
image, task and frame (sample = the task, or the subset; acquisition = the source image), and for
detections the model (process).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from serverless.errors import UserError
from trainer.data.options import split_unvalidated

if TYPE_CHECKING:
    from trainer.crop.worker import CropJob, CropObject

ECOTAXA_TSV = "ecotaxa_crops.tsv"
#: (column, type) of every line; process columns are added for detections.
COLUMNS = [
    ("img_file_name", "[t]"), ("img_rank", "[f]"), ("object_id", "[t]"),
    ("object_annotation_category", "[t]"), ("object_annotation_status", "[t]"),
    ("object_cvat_label", "[t]"), ("object_score", "[f]"),
    ("object_source_image", "[t]"), ("object_task_id", "[f]"), ("object_frame", "[f]"),
    ("object_bbox_x1", "[f]"), ("object_bbox_y1", "[f]"), ("object_bbox_x2", "[f]"),
    ("object_bbox_y2", "[f]"), ("object_rotation", "[f]"), ("object_width_px", "[f]"),
    ("object_height_px", "[f]"), ("object_occluded", "[f]"),
    ("object_pixel_size_um", "[f]"), ("object_width_um", "[f]"), ("object_height_um", "[f]"),
    ("sample_id", "[t]"), ("acq_id", "[t]"),
]  # fmt: skip
PROCESS_COLUMNS = [("process_id", "[t]"), ("process_model", "[t]"), ("process_model_created", "[t]"),
                   ("process_architecture", "[t]"), ("process_software", "[t]")]  # fmt: skip
PROCESS_KEYS = ("id", "model", "created", "architecture", "software")


@dataclass(frozen=True)
class EcoTaxaOptions:
    """What the crop exporter knows only from the user or the model."""

    pixel_size: float | None = None  # µm per source pixel
    process: dict[str, str] = field(default_factory=dict)  # model name, architecture, software


class EcoTaxaTable:
    """Rows of ``ecotaxa_crops.tsv``, staged beside metadata.csv and published with it; with
    ``append``, the rows of the existing file come first."""

    def __init__(self, staging: Path, out: Path, append: bool, options: EcoTaxaOptions) -> None:
        self.options = options
        self.columns = COLUMNS + (PROCESS_COLUMNS if options.process else [])
        self._file = (staging / ECOTAXA_TSV).open("w", newline="", encoding="utf-8-sig")
        self._writer = csv.writer(self._file, delimiter="\t", lineterminator="\n")
        self._writer.writerow([name for name, _ in self.columns])
        self._writer.writerow([kind for _, kind in self.columns])
        if append and (out / ECOTAXA_TSV).is_file():
            self._copy_rows(out / ECOTAXA_TSV)

    def _copy_rows(self, old: Path) -> None:
        with old.open(newline="", encoding="utf-8-sig") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            if header != [name for name, _ in self.columns]:
                raise UserError(
                    f"{old}: its columns differ from this run's (detections and annotations have "
                    "different ones); write to a new folder instead of --append"
                )
            fh.readline()  # types
            self._file.flush()
            shutil.copyfileobj(fh, self._file)

    def add(self, job: CropJob) -> None:
        for obj in job.objects:
            self._writer.writerow(_row(job, obj, self.options))

    def close(self) -> None:
        self._file.close()


def _row(job: CropJob, obj: CropObject, options: EcoTaxaOptions) -> list[str]:
    label = obj.shape.label
    category, validated = split_unvalidated(label)
    x1, y1, x2, y2 = obj.box
    width, height = x2 - x1, y2 - y1
    size = options.pixel_size
    sample = f"task_{job.task_id}" if job.task_id is not None else job.subset
    row: list[Any] = [
        obj.crop_path, 0, f"{job.subset}/{PurePosixPath(obj.crop_path).stem}",
        category, "predicted" if not validated or obj.score is not None else "validated", label,
        "" if obj.score is None else f"{obj.score:.4f}",
        job.source_image, _blank(job.task_id), _blank(job.frame),
        *(_num(v) for v in (x1, y1, x2, y2)), _num(obj.region.rotation), _num(width), _num(height),
        int(obj.shape.occluded),
        _blank(size), _num(width * size) if size else "", _num(height * size) if size else "",
        sample, f"{sample}/{job.source_image}",
    ]  # fmt: skip
    if options.process:
        row += [options.process.get(key, "") for key in PROCESS_KEYS]
    return [str(v) for v in row]


def _num(value: float) -> str:
    return f"{float(value):.3f}".rstrip("0").rstrip(".")


def _blank(value: Any) -> Any:
    return "" if value is None else value


def process_fields(detector: Any) -> dict[str, str]:
    """The model of detection crops: its name (the run's folder) and version (when it was
    trained), architecture, and the cvat-detector version that trained it."""
    from trainer import __version__

    info, name = detector.info, Path(detector.bundle_dir).resolve().name
    provenance = info.provenance or {}
    trained_with = provenance.get("versions", {}).get("cvat_detector") or __version__
    return {"id": name, "model": name, "created": str(provenance.get("created", "")),
            "architecture": info.architecture, "software": f"cvat-detector {trained_with}"}  # fmt: skip
