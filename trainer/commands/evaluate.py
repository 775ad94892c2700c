"""COCO-evaluate a trained bundle on annotated data: mAP, per-class AP, best-F1 thresholds.

Labels are matched by name between the data and the model; data labels the model does not know
are ignored (and reported). Results go to RUN/eval-<subset>/ (results.txt, metrics.json, plots/).

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

if TYPE_CHECKING:
    from trainer.data.records import DetectionData, ImageRecord

HELP = "COCO mAP, per-class AP and calibrated thresholds of a bundle on annotated data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.data.options import add_data_arguments

    parser.add_argument(
        "run", metavar="RUN", help="trained run / bundle directory (has model.json)"
    )
    add_data_arguments(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--subset",
        help="images to evaluate: a subset name (Test, Validation, ...) or 'all' "
        "(default: the validation split, as training chose it)",
    )
    g.add_argument(
        "--iou-type",
        default="bbox",
        choices=["bbox", "segm"],
        help="compare boxes, or masks of a mask model (default: %(default)s)",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    g.add_argument(
        "--out", help="folder for results.txt, metrics.json, plots (default: RUN/eval-SUBSET)"
    )
    g.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    from serverless.bundle import load_info
    from serverless.detector import Detector, pick_device
    from serverless.errors import UserError
    from trainer.data.options import load_from_args
    from trainer.evaluation import plots, report
    from trainer.evaluation.calibration import calibrate_thresholds
    from trainer.evaluation.metrics import evaluate_detections, predict_records

    info = load_info(args.run)  # a clear error before any data is read
    if args.iou_type == "segm" and info.shape_type != "mask":
        raise UserError(f"{args.run}: --iou-type segm needs a mask model (this one serves boxes)")
    try:
        device = pick_device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device}: {exc}") from exc
    data = load_from_args(args)
    _adopt_split_options(args, info.provenance)
    name, records = _select(args, data, info.provenance.get("config", {}).get("seed", 0))
    _check_labels(records, info.labels)
    detector = Detector(args.run, device=str(device))
    gts, preds = predict_records(detector, records, masks=args.iou_type == "segm")
    result = evaluate_detections(
        gts, preds, info.labels, max_dets=max(300, info.detections_per_img), iou_type=args.iou_type
    )
    calibration = calibrate_thresholds(gts, preds, info.labels)
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{_slug(name)}"
    report.write_reports(out, result, calibration)
    plots.write_plots(out, calibration)
    if args.json:
        print(json.dumps(report.metrics_dict(result, calibration), allow_nan=False))
    else:
        print(f"{args.run} on {name} ({len(records)} images):")
        print(report.format_table(result, calibration))
        print(f"results written to {out}/")
    return 0


def _adopt_split_options(args: argparse.Namespace, provenance: dict) -> None:
    """Use the run's own --val-fraction/--subset-map unless given here: the same held-out images."""
    saved = provenance.get("split_options", {})
    if args.val_fraction == 0.2 and "val_fraction" in saved:
        args.val_fraction = saved["val_fraction"]
    if not args.subset_map and saved.get("subset_map"):
        args.subset_map = list(saved["subset_map"].items())


def _select(
    args: argparse.Namespace, data: DetectionData, seed: int
) -> tuple[str, list[ImageRecord]]:
    """(name, records) of the images to evaluate; a clear error when there are none.

    The default validation split is recomputed with the training run's seed, so a seeded split
    (no Validation subset in the data) gives the same images training held out.
    """
    from serverless.errors import UserError
    from trainer.data.options import split_from_args

    if args.subset is None:
        args.seed = seed
        try:
            name, records = "validation", split_from_args(args, data)["val"]
        except UserError as exc:
            raise UserError(f"{exc} (or choose the images with --subset NAME|all)") from exc
    elif args.subset.lower() == "all":
        name, records = "all", list(data.images)
    else:
        name, records = args.subset, data.subset(args.subset)
    if not records:
        subsets = sorted({im.subset for im in data.images})
        raise UserError(
            f"--subset {args.subset or '(validation split)'}: no images to evaluate; "
            f"subsets in the data: {', '.join(subsets) or 'none'} (or 'all')"
        )
    return name, records


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
