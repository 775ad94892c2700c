"""COCO-evaluate a trained bundle on annotated data: mAP, per-class AP, best-F1 thresholds.

By default exactly the validation images the run recorded (split.json) are evaluated, those of
them DATA holds; how many are missing and how many images of DATA are new is said. Any other
choice (--subset) is checked against the run's training images, and a warning says how many of
them are among the evaluated ones. Labels are matched by name between the data and the model;
data labels the model does not know are ignored (and reported). Results go to RUN/eval-<subset>/
(results.txt, metrics.json, plots/).

Examples:
  python -m trainer evaluate runs/cells project_export.zip                  # validation split
  python -m trainer evaluate runs/cells project_export.zip --subset Test
  python -m trainer evaluate runs/cells export.zip --subset all --json > metrics.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.commands import add_model_options, add_options
from trainer.data.options import DataOptions

if TYPE_CHECKING:
    from trainer.data.records import DetectionData, ImageRecord
    from trainer.data.splits import RecordedSplit

HELP = "COCO mAP, per-class AP and calibrated thresholds of a bundle on annotated data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="trained run / bundle directory (has model.json)"
    )
    add_options(parser, DataOptions, "data")
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--subset",
        help="images to evaluate: a subset name (Test, Validation, ...) or 'all' "
        "(default: the run's recorded validation images that DATA holds)",
    )
    g.add_argument(
        "--iou-type",
        default="bbox",
        choices=["bbox", "segm"],
        help="compare boxes, or masks of a mask model (default: %(default)s)",
    )
    add_model_options(g, threshold=False, engine=False)
    g.add_argument(
        "--out", help="folder for results.txt, metrics.json, plots (default: RUN/eval-SUBSET)"
    )
    g.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    from serverless.bundle import load_info
    from serverless.detector import Detector, pick_device
    from serverless.errors import UserError
    from trainer.commands import read_options
    from trainer.data.options import load_from_args
    from trainer.data.readers.labels import unvalidated_note
    from trainer.data.splits import read_split
    from trainer.evaluation import plots, report
    from trainer.evaluation.calibration import calibrate_thresholds
    from trainer.evaluation.metrics import evaluate_detections, predict_records

    info = load_info(args.run)  # a clear error before any data is read
    if args.iou_type == "segm" and info.shape_type != "mask":
        raise UserError(f"{args.run}: --iou-type segm needs a mask model (this one serves boxes)")
    device = pick_device(args.device)
    recorded = read_split(args.run)
    data_options = read_options(DataOptions, args)
    data = load_from_args(data_options)
    name, records, notes = _select(args.subset, data, recorded, info.provenance, args.run)
    notes += [n for n in [unvalidated_note(data.skipped, data_options.unvalidated_suffix)] if n]
    for note in notes:
        print(note, file=sys.stderr)
    _check_labels(records, info.labels)
    detector = Detector(args.run, device=str(device))
    gts, preds = predict_records(
        detector, records, masks=args.iou_type == "segm", max_pixels=data.max_pixels
    )
    result = evaluate_detections(
        gts, preds, info.labels, max_dets=max(300, info.detections_per_img), iou_type=args.iou_type
    )
    calibration = calibrate_thresholds(gts, preds, info.labels)
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{_slug(name)}"
    header = [f"{args.run} evaluated on {name}: {len(records)} images of {', '.join(data.sources)}",
              f"{args.run} applies: {report.bundle_thresholds(info)}"]
    report.write_reports(out, result, calibration, header=header, notes=notes)
    plots.write_plots(out, calibration)
    if args.json:
        print(json.dumps({**report.metrics_dict(result, calibration), "notes": notes}, allow_nan=False))
    else:
        print(f"{args.run} on {name} ({len(records)} images):")
        print(report.format_table(result, calibration) + " (calibrated on these images)")
        print(header[1])
        print(f"results written to {out}/")
    return 0


def _select(
    subset: str | None, data: DetectionData, recorded: RecordedSplit | None, provenance: dict, run: str
) -> tuple[str, list[ImageRecord], list[str]]:
    """(name, records, notes) of the images to evaluate; a clear error when there are none.

    By default: exactly the run's recorded validation images that ``data`` holds. Any other
    choice is checked against the run's training images.
    """
    from serverless.errors import UserError

    if subset is None:
        if recorded is None:
            return _recomputed_validation(data, provenance, run)
        return _recorded_validation(data, recorded, run)
    name, records = ("all", list(data.images)) if subset.lower() == "all" else (subset, data.subset(subset))
    if not records:
        subsets = sorted({im.subset for im in data.images})
        raise UserError(
            f"--subset {subset}: no images to evaluate; "
            f"subsets in the data: {', '.join(subsets) or 'none'} (or 'all')"
        )
    return name, records, _training_images_note(records, recorded, run)


def _recorded_validation(
    data: DetectionData, recorded: RecordedSplit, run: str
) -> tuple[str, list[ImageRecord], list[str]]:
    from serverless.errors import UserError
    from trainer.data.splits import split_data

    wanted = recorded.roles["val"]
    records = [im for im in data.images if im.identity in wanted]
    here = {im.identity for im in data.images}
    new = [im for im in data.images if recorded.role_of(im.identity) is None]
    notes = [f"validation images of {run}: {len(wanted)} recorded, {len(records)} in this data, "
             f"{len(wanted - here)} missing from it"]
    if new:
        try:
            roles = split_data(data, recorded.options, recorded, require_train=False)
            ids = {role: {im.identity for im in images} for role, images in roles.items()}
            given = ", ".join(f"{role} {sum(im.identity in ids[role] for im in new)}" for role in ids)
        except UserError:
            given = "unknown"
        notes.append(f"{len(new)} images of this data are new to {run} (not evaluated; its split "
                     f"gives them: {given})")
    if not wanted:
        raise UserError(f"{run} was trained without validation images; evaluate annotated images it was "
                        "not trained on with --subset NAME|all")
    if not records:
        raise UserError(
            f"none of the {len(wanted)} validation images of {run} is in this data; evaluate "
            "other images with --subset NAME|all"
        )
    return "validation", records, notes


def _recomputed_validation(
    data: DetectionData, provenance: dict, run: str
) -> tuple[str, list[ImageRecord], list[str]]:
    """Runs older than split.json: their split options with today's rules, said loudly."""
    from serverless.bundle import SPLIT_JSON
    from serverless.errors import UserError
    from trainer.data.splits import SplitOptions, split_data

    saved = provenance.get("split_options", {})
    options = SplitOptions.from_dict({"seed": provenance.get("config", {}).get("seed", 0), **saved})
    try:
        records = split_data(data, options, require_train=False)["val"]
    except UserError as exc:
        raise UserError(f"{exc} (or choose the images with --subset NAME|all)") from exc
    if not records:
        raise UserError("this data's validation split is empty; choose the images with --subset NAME|all")
    return "validation", records, [
        f"WARNING: {run} recorded no {SPLIT_JSON} (trained by an older version): the validation images "
        "are chosen again with today's split rules and may include images it was trained on"
    ]


def _training_images_note(records: list[ImageRecord], recorded: RecordedSplit | None, run: str) -> list[str]:
    if recorded is None:
        return [f"note: {run} recorded no split: whether these images were trained on is unknown"]
    trained = sum(im.identity in recorded.roles["train"] for im in records)
    if not trained:
        return []
    return [f"WARNING: {trained} of these {len(records)} images are training images of {run}: "
            "the numbers below flatter the model (evaluate without --subset for its validation images)"]


def _check_labels(records: list[ImageRecord], model_labels: list[str]) -> None:
    """Say which labels cannot be scored; refuse when the data and model share none."""
    from collections import Counter

    from serverless.errors import UserError

    counts = Counter(s.label for im in records for s in im.shapes)
    unknown = sorted(set(counts) - set(model_labels))
    absent = [name for name in model_labels if not counts.get(name)]
    if counts and len(unknown) == len(counts):
        raise UserError(
            f"no label of the data ({', '.join(sorted(counts))}) is a label of the model "
            f"({', '.join(model_labels)}); labels are matched by name"
        )
    if unknown:
        listed = ", ".join(f"{name} ({counts[name]})" for name in unknown)
        print(f"note: ignoring data labels the model does not know: {listed}", file=sys.stderr)
    if absent:
        print(
            f"note: model labels without objects here (no AP): {', '.join(absent)}", file=sys.stderr
        )


def _slug(name: str) -> str:
    """A subset name made safe as a folder name."""
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_") or "subset"
