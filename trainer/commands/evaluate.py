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

from trainer.commands import add_model_options, add_options
from trainer.data.options import DataOptions

if TYPE_CHECKING:
    from trainer.data.records import DetectionData, ImageRecord
    from trainer.data.splits import SplitOptions

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
        "(default: the validation split, as training chose it)",
    )
    g.add_argument(
        "--iou-type",
        default="bbox",
        choices=["bbox", "segm"],
        help="compare boxes, or masks of a mask model (default: %(default)s)",
    )
    add_model_options(g, threshold=False)
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
    from trainer.evaluation import plots, report
    from trainer.evaluation.calibration import calibrate_thresholds
    from trainer.evaluation.metrics import evaluate_detections, predict_records

    info = load_info(args.run)  # a clear error before any data is read
    if args.iou_type == "segm" and info.shape_type != "mask":
        raise UserError(f"{args.run}: --iou-type segm needs a mask model (this one serves boxes)")
    device = pick_device(args.device)
    data = load_from_args(read_options(DataOptions, args))
    name, records = _select(args.subset, data, _run_split_options(args, info.provenance))
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
    report.write_reports(out, result, calibration)
    plots.write_plots(out, calibration)
    if args.json:
        print(json.dumps(report.metrics_dict(result, calibration), allow_nan=False))
    else:
        print(f"{args.run} on {name} ({len(records)} images):")
        print(report.format_table(result, calibration))
        print(f"results written to {out}/")
    return 0


def _run_split_options(args: argparse.Namespace, provenance: dict) -> SplitOptions:
    """The run's own split options, except those given here: the same held-out images."""
    from trainer.commands import read_options
    from trainer.data.options import split_options
    from trainer.data.splits import SplitOptions

    given = read_options(DataOptions, args)
    saved = provenance.get("split_options", {})
    seed = saved.get("seed", provenance.get("config", {}).get("seed", 0))
    options = split_options(given, seed)
    return SplitOptions(
        val_fraction=options.val_fraction if "val_fraction" in vars(args) else saved.get(
            "val_fraction", options.val_fraction),
        test_fraction=saved.get("test_fraction", options.test_fraction),
        seed=seed,
        subset_map=options.subset_map if "subset_map" in vars(args) else saved.get("subset_map", {}),
    )


def _select(
    subset: str | None, data: DetectionData, options: SplitOptions
) -> tuple[str, list[ImageRecord]]:
    """(name, records) of the images to evaluate; a clear error when there are none.

    The default validation split is recomputed with the training run's split options, so a seeded
    split (no Validation subset in the data) gives the same images training held out.
    """
    from serverless.errors import UserError
    from trainer.data.splits import split_data

    if subset is None:
        try:
            name, records = "validation", split_data(data, options, require_train=False)["val"]
        except UserError as exc:
            raise UserError(f"{exc} (or choose the images with --subset NAME|all)") from exc
    elif subset.lower() == "all":
        name, records = "all", list(data.images)
    else:
        name, records = subset, data.subset(subset)
    if not records:
        subsets = sorted({im.subset for im in data.images})
        raise UserError(
            f"--subset {subset or '(validation split)'}: no images to evaluate; "
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
