"""Cut every object out as its own image file, ready for classifier training (ImageFolder layout).

Objects come from CVAT exports or a CVAT server (like every other command), or from a trained
model run over a folder of images (--model RUN --images DIR). Output:
OUT/<label>/<subset>/<image>__<object-id>.png and OUT/metadata.csv (one row per crop). A re-run
replaces OUT as a whole; --append adds to it. --ecotaxa also writes OUT/ecotaxa_crops.tsv, so that
OUT (or a zip of it) imports into EcoTaxa as it is, with label, validation status, score, box,
source image, task and frame, the model, and sizes in µm with --pixel-size.

examples:
  cvat-detector-crop project_export.zip --out crops/ --padding 8 --square
  cvat-detector-crop export.zip --out crops/ --labels WBC,Platelets --border pad --mask-alpha
  cvat-detector-crop --model runs/bccd --images slides/ --threshold 0.6 --out crops/
  cvat-detector-crop export.zip --out crops/ --padding 4 --ecotaxa --pixel-size 0.65
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from trainer.commands import non_negative

if TYPE_CHECKING:
    from serverless.detector import Detector
    from trainer.crop.exporter import CropSummary
    from trainer.data.options import DataOptions
    from trainer.data.records import DetectionData

HELP = "export every object as an image file plus metadata.csv (for classifier training)"


_non_negative = non_negative(float, "a number")


def _colour(text: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise argparse.ArgumentTypeError(f"expected R,G,B with values 0-255, got {text!r}")
    return rgb  # type: ignore[return-value]


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _workers(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 worker, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.commands import add_model_options, add_options
    from trainer.data.options import DataOptions

    add_options(parser, DataOptions, "data")
    parser.add_argument("--out", "-o", required=True, metavar="OUT", help="folder for the crops")
    det = parser.add_argument_group("crops of a model's detections (instead of DATA)")
    det.add_argument("--model", metavar="RUN", help="trained model (a run / bundle folder)")
    det.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    add_model_options(det)
    _add_geometry(parser.add_argument_group("what is cut"))
    _add_output(parser.add_argument_group("how it is written"))


def _add_geometry(geo: argparse._ArgumentGroup) -> None:
    pad = geo.add_mutually_exclusive_group()
    pad.add_argument(
        "--padding", type=_non_negative, default=0.0, metavar="PX",
        help="pixels of context added on every side",
    )  # fmt: skip
    pad.add_argument(
        "--padding-frac", type=_non_negative, default=0.0, metavar="F",
        help="context as a fraction of the box's width (left, right) and height (top, bottom)",
    )  # fmt: skip
    geo.add_argument(
        "--square", action="store_true",
        help="widen the shorter side so crops are square (never stretched)",
    )  # fmt: skip
    geo.add_argument(
        "--border", choices=("clip", "pad"), default="clip",
        help="crops reaching past the image: clip them (default) or pad them with --pad-color",
    )  # fmt: skip
    geo.add_argument(
        "--pad-color", type=_colour, default=(0, 0, 0), metavar="R,G,B",
        help="fill for --border pad and for rotated crops reaching past the image (0,0,0)",
    )  # fmt: skip
    geo.add_argument(
        "--min-size", type=_non_negative, default=0.0, metavar="PX",
        help="skip objects whose shorter side is below PX pixels",
    )  # fmt: skip
    geo.add_argument(
        "--mask-alpha", action="store_true",
        help="RGBA PNG: transparent outside the object's mask, polygon or box",
    )  # fmt: skip


def _add_output(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--format", choices=("png", "source"), default="png",
        help="png (lossless, default) or each source image's own format (jpg stays jpg)",
    )  # fmt: skip
    out.add_argument(
        "--no-subsets", action="store_true",
        help="OUT/<label>/<file> instead of OUT/<label>/<subset>/<file>",
    )  # fmt: skip
    out.add_argument(
        "--append", action="store_true",
        help="add to an existing crop folder (refuses crops it already lists)",
    )  # fmt: skip
    out.add_argument(
        "--ecotaxa", action="store_true",
        help="also write OUT/ecotaxa_crops.tsv, an EcoTaxa import of the crops",
    )  # fmt: skip
    out.add_argument(
        "--pixel-size", type=_positive, metavar="UM",
        help="micrometres per source pixel: object sizes in µm in the EcoTaxa table",
    )  # fmt: skip
    out.add_argument(
        "--workers", type=_workers, default=os.cpu_count() or 1, metavar="N",
        help="parallel workers (default: one per CPU core)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from serverless.errors import UserError
    from trainer.commands import read_options
    from trainer.crop.ecotaxa import EcoTaxaOptions
    from trainer.crop.exporter import CropOptions, crop_annotations, crop_detections
    from trainer.crop.geometry import CropSpec
    from trainer.data.options import DataOptions, with_unvalidated_labels

    data_options = with_unvalidated_labels(read_options(DataOptions, args))
    if args.mask_alpha and args.format == "source":
        raise UserError("--mask-alpha writes RGBA PNG files; it cannot go with --format source")
    if args.pixel_size is not None and not args.ecotaxa:
        raise UserError("--pixel-size: the sizes in µm go into the EcoTaxa table; add --ecotaxa")
    spec = CropSpec(
        padding=args.padding,
        padding_frac=args.padding_frac,
        square=args.square,
        border=args.border,
        pad_color=args.pad_color,
        min_size=args.min_size,
        mask_alpha=args.mask_alpha,
    )
    options = CropOptions(
        spec=spec,
        fmt=args.format,
        subsets=not args.no_subsets,
        workers=args.workers,
        append=args.append,
        skip_missing=data_options.skip_missing,
        ecotaxa=EcoTaxaOptions(pixel_size=args.pixel_size) if args.ecotaxa else None,
    )
    labels, read_skipped = data_options.labels, {}
    if args.model:
        _check_detection_args(args, data_options)
        summary = crop_detections(
            _load_detector(args, labels), args.images, args.out, options,
            threshold=args.threshold, labels=labels,
        )  # fmt: skip
    else:
        _check_annotation_args(args)
        data = _load_all_labels(data_options)
        summary = crop_annotations(data, args.out, options, labels)
        read_skipped = data.skipped
    _print_summary(summary, read_skipped, args.ecotaxa)
    return 0


def _check_detection_args(args: argparse.Namespace, data_options: DataOptions) -> None:
    from pathlib import Path

    from serverless.errors import UserError

    if not args.images:
        raise UserError("--model needs --images DIR: the folder of images to run it on")
    if not Path(args.images).is_dir():
        raise UserError(f"--images {args.images}: not a folder")
    if data_options.data or data_options.server:
        raise UserError("--model crops detections on --images; do not also give DATA or --server")


def _check_annotation_args(args: argparse.Namespace) -> None:
    from serverless.errors import UserError

    given = [f"--{n}" for n in ("images", "threshold") if getattr(args, n) is not None]
    if given:
        raise UserError(f"{' and '.join(given)} only apply with --model RUN")


def _load_detector(args: argparse.Namespace, labels: list[str] | None) -> Detector:
    """The model, once its labels are known to cover --labels (loading weights takes a while)."""
    from serverless.bundle import load_info
    from trainer.crop.exporter import check_labels
    from trainer.deploy.export import detector_for, folder_frames

    check_labels(labels, load_info(args.model).labels)
    frames = folder_frames(args.images) if args.engine == "openvino" else None
    return detector_for(args.model, args.device, args.engine, frames)


def _load_all_labels(data_options: DataOptions) -> DetectionData:
    """The data with every label: --labels is applied by the crop exporter itself, so an object
    without an export id keeps the same index (and file name) whichever labels are selected."""
    from dataclasses import replace

    from trainer.data.options import load_from_args

    return load_from_args(replace(data_options, labels=None))


def _print_summary(summary: CropSummary, read_skipped: dict[str, int], ecotaxa: bool) -> None:
    rate = summary.total / summary.seconds if summary.seconds else 0.0
    print(
        f"wrote {summary.total} crops of {summary.images} images to {summary.out} "
        f"in {summary.seconds:.1f} s ({rate:.0f} objects/s)"
    )
    width = max((len(name) for name in summary.crops), default=0)
    for name, count in sorted(summary.crops.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<{width}}  {count}")
    for reason, count in summary.skipped.items():
        print(f"skipped {count} {reason}")
    for note, count in summary.notes.items():
        print(f"note: {count} {note}")
    for reason, count in read_skipped.items():
        print(f"left out while reading the data: {count} x {reason}")
    print(f"metadata: {summary.out / 'metadata.csv'}")
    if ecotaxa:
        from trainer.crop.ecotaxa import ECOTAXA_TSV

        print(f"EcoTaxa import: {summary.out / ECOTAXA_TSV} (import the folder, or a zip of it)")
