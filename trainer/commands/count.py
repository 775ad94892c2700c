"""Count objects per image, per sample and per label, from annotations or from a model.

Annotations (CVAT exports or --server, as every data command reads them): validated labels and
not-validated ones ("<label>_NV", pre-annotations nobody confirmed) are counted apart. A sample is
the CVAT task (or the subset when the export has no task ids). Unannotated images are left out
unless --keep-empty (then they count as zeros).

A model (--model RUN on --images DIR, or on every frame of --server tasks): raw detection counts,
and a corrected estimate N = count x precision / recall with a 95 % interval, from the precision
and recall measured on validation images at the threshold used: the run's own validation (saved
in model.json, for its calibrated thresholds), or --validation EXPORT (any annotated export; needed
with --threshold). A sample is the image's folder, or the task. A warning says when the validation
set is too small to support the correction (fewer than 30 objects or 10 found of a label).

Writes OUT/per_image.csv, OUT/per_sample.csv, OUT/per_label.csv and OUT/counts.png.

examples:
  python -m trainer count project_export.zip --out counts/
  python -m trainer count --server https://cvat.example.org --project 4 --out counts/ --json
  python -m trainer count --model runs/cells --images station_*/ --out counts/
  python -m trainer count --model runs/cells --images slides/ --threshold 0.6 --validation val_export.zip
  python -m trainer count --model runs/cells --server https://cvat.example.org --tasks 15,16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = "object counts per image, sample and label (annotations, or a model with corrected estimates)"

IMAGE_COLUMNS = ("image", "sample", "label", "validated", "not_validated", "total")
SAMPLE_COLUMNS = ("sample", "label", "images", "validated", "not_validated", "total")
LABEL_COLUMNS = ("label", "images", "validated", "not_validated", "total")
CORRECTION_COLUMNS = ("corrected", "low", "high")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.commands import add_model_options, add_options
    from trainer.data.options import DataOptions

    add_options(parser, DataOptions, "data (annotations; with --model, --server and --tasks name the tasks)")
    model = parser.add_argument_group("counts of a model's detections")
    model.add_argument("--model", metavar="RUN", help="trained run (bundle) directory")
    model.add_argument("--images", metavar="DIR", type=Path, help="folder of images (recursive)")
    model.add_argument(
        "--validation", metavar="EXPORT", action="append", default=[],
        help="annotated export(s) to measure precision and recall on (default: the run's own validation)",
    )  # fmt: skip
    add_model_options(model)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("counts"), metavar="DIR",
                     help="output folder (%(default)s)")  # fmt: skip
    out.add_argument("--json", action="store_true", help="print the per-label and per-sample rows as JSON")


def run(args: argparse.Namespace) -> int:
    from serverless.errors import UserError
    from trainer.commands import read_options
    from trainer.data.options import DataOptions, load_from_args, split_unvalidated, with_unvalidated_labels
    from trainer.evaluation.counts import count_annotations, tabulate

    options = with_unvalidated_labels(read_options(DataOptions, args))
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder")
    warnings: list[str] = []
    if args.model:
        tables, labels, kind, failed = _model_tables(args, options, warnings)
    else:
        given = [f"--{n}" for n in ("images", "threshold") if getattr(args, n) is not None]
        given += ["--validation"] if args.validation else []
        if given:
            raise UserError(f"{' and '.join(given)} only apply with --model RUN")
        data = load_from_args(options, require_images=False)
        labels = list(dict.fromkeys(split_unvalidated(name)[0] for name in data.labels))
        tables, kind, failed = tabulate(count_annotations(data.images), labels), "annotations", []
    _write(args.out, tables, labels, kind)
    _report(args, tables, warnings, failed, kind)
    return 0


def _model_tables(args: argparse.Namespace, options: Any, warnings: list[str]) -> tuple:
    from serverless.detector import Detector
    from serverless.errors import UserError
    from trainer.evaluation.counts import add_corrections, tabulate

    if options.data:
        raise UserError("--model counts detections on --images or --server tasks; exports go in --validation")
    if (args.images is None) == (options.server is None):
        raise UserError("--model needs --images DIR or --server URL with --tasks/--project")
    if args.images is not None and not args.images.is_dir():
        raise UserError(f"--images {args.images}: not a folder")
    detector = Detector(args.model, args.device)
    if args.images is not None:
        counts, failed = _count_folder(detector, args)
    else:
        counts, failed = _count_tasks(detector, args, options)
    evidence = _evidence(detector, args, warnings)
    tables = tabulate(counts, detector.labels)
    add_corrections(tables, evidence)
    return tables, detector.labels, "model", failed


def _count_folder(detector: Any, args: argparse.Namespace) -> tuple[list, list[str]]:
    from serverless.errors import UserError
    from serverless.imageio import read_image
    from trainer.evaluation.counts import count_detections
    from trainer.inference import find_images

    paths = find_images(args.images)
    if not paths:
        raise UserError(f"--images {args.images}: no .jpg/.jpeg/.png/.tif/.tiff/.bmp files found")
    root = args.images

    def describe(path: Path) -> tuple[str, str]:
        rel = path.relative_to(root)
        return rel.as_posix(), rel.parent.as_posix() if rel.parent != Path() else root.name or "."

    return count_detections(detector, paths, read_image, describe, args.threshold)


def _count_tasks(detector: Any, args: argparse.Namespace, options: Any) -> tuple[list, list[str]]:
    from serverless.errors import UserError
    from trainer.cvat.server import connect
    from trainer.cvat.upload import fetch_frame, task_frames, upload_errors
    from trainer.evaluation.counts import count_detections

    if not options.tasks and options.project is None:
        raise UserError("--server needs --tasks IDS or --project ID")
    with connect(options.server) as client, upload_errors(options.server):
        tasks, items = task_frames(client, options.tasks or (), options.project, all_frames=True)
        return count_detections(
            detector, items, lambda item: fetch_frame(tasks[item[0]], item[1]),
            lambda item: (item[2] or f"frame {item[1]}", f"task {item[0]}"), args.threshold,
        )  # fmt: skip


def _evidence(detector: Any, args: argparse.Namespace, warnings: list[str]) -> dict:
    """Precision and recall per label at the thresholds used; warnings where they are missing
    or rest on too few objects."""
    from trainer.evaluation.counts import evidence_from_bundle, evidence_from_curves

    if args.validation:
        from trainer.data.readers import load_dataset
        from trainer.evaluation.calibration import calibrate_thresholds
        from trainer.evaluation.metrics import predict_records

        data = load_dataset(args.validation)
        gts, preds = predict_records(detector, data.images)
        thresholds = dict(zip(detector.labels, detector.thresholds(args.threshold).tolist(), strict=True))
        evidence = evidence_from_curves(calibrate_thresholds(gts, preds, detector.labels), thresholds)
    else:
        evidence = evidence_from_bundle(detector.info, args.threshold)
    for label in detector.labels:
        if label not in evidence or evidence[label].tp == 0:
            how = "pass --validation EXPORT" if args.threshold is not None or not args.validation else ""
            warnings.append(f"{label}: no precision/recall measured at the threshold used, so no "
                            f"corrected count{'; ' + how if how else ''}")  # fmt: skip
        elif warning := evidence[label].warning():
            warnings.append(warning)
    return evidence


def _write(out: Path, tables: dict, labels: list[str], kind: str) -> None:
    from trainer.evaluation.counts import plot_counts

    out.mkdir(parents=True, exist_ok=True)
    extra = CORRECTION_COLUMNS if kind == "model" else ()
    _csv(out / "per_image.csv", tables["image"], IMAGE_COLUMNS)
    _csv(out / "per_sample.csv", tables["sample"], SAMPLE_COLUMNS + extra)
    _csv(out / "per_label.csv", tables["label"], LABEL_COLUMNS + extra)
    title = "detections per sample" if kind == "model" else "annotated objects per sample"
    plot_counts(tables["sample"], labels, out / "counts.png", title)


def _csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    import csv
    import io

    from serverless.bundle import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode("utf-8")))


def _report(
    args: argparse.Namespace, tables: dict, warnings: list[str], failed: list[str], kind: str
) -> None:
    import json

    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        report = {"out": str(args.out), "source": kind, "per_label": tables["label"],
                  "per_sample": tables["sample"], "warnings": warnings, "skipped": failed}
        print(json.dumps(report))
        return
    images = tables["label"][0]["images"] if tables["label"] else 0
    print(f"{kind}: {images} image(s), {len({r['sample'] for r in tables['sample']})} sample(s)")
    head = f"  {'label':<16} {'validated':>9} {'not val.':>9} {'total':>7}"
    print(head + ("   corrected [95 % interval]" if kind == "model" else ""))
    for r in tables["label"]:
        line = f"  {r['label']:<16} {r['validated']:>9} {r['not_validated']:>9} {r['total']:>7}"
        if kind == "model" and r["corrected"] != "":
            line += f"   {r['corrected']:>9} [{r['low']}, {r['high']}]"
        print(line)
    for reason in failed:
        print(f"skipped {reason}")
    print(f"wrote {args.out}/per_image.csv, per_sample.csv, per_label.csv, counts.png")
