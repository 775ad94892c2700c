"""Run a trained bundle on a folder of images, or pre-annotate CVAT tasks with it.

Folder: every JPEG/PNG/TIFF/BMP under DIR (recursively) -> a COCO-style results file (file_name
relative to DIR; bbox [x, y, w, h], score, category_id; RLE segmentation for mask models), plus
optional previews with boxes and scores drawn. Unreadable files are listed and skipped.

Server: detections go into the tasks through cvat-sdk, only on frames without annotations unless
--all-frames (existing shapes are never deleted). --label-suffix _NV (or --nv) writes them under
"<label>_NV" labels to mark them not validated: train, evaluate and inspect leave labels ending in
_NV out (with the images holding them) until a person corrects them to the real label. Another
suffix needs the same --unvalidated-suffix there. --create-labels checks every label of every task
before it creates any. Each score is also written as the attribute
"score" of a task label that has one (type text: "0.873"; number 0-100 step 1: "87"), the only
place CVAT keeps it. Credentials come from the environment: CVAT_ACCESS_TOKEN, or CVAT_USER and
CVAT_PASSWORD.

examples:
  python -m trainer predict runs/bccd --images photos/ --out photos.json --previews previews/
  python -m trainer predict runs/bccd --server https://cvat.example.org --tasks 15,16 --nv --dry-run
  python -m trainer predict runs/bccd --server https://cvat.example.org --project 4 --nv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.commands import add_model_options, add_task_options
from trainer.data.options import UNVALIDATED_SUFFIX

HELP = "detect objects in a folder of images, or pre-annotate CVAT tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="trained run (bundle) directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--images", metavar="DIR", type=Path, help="folder of images (recursive)")
    target.add_argument("--server", metavar="URL", help="CVAT server to pre-annotate tasks on")
    add_model_options(parser)

    folder = parser.add_argument_group("folder (--images)")
    folder.add_argument(
        "--out", type=Path, default=Path("predictions.json"), help="results file (%(default)s)"
    )
    folder.add_argument("--previews", type=Path, metavar="DIR", help="also draw detections here")
    folder.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    server = parser.add_argument_group("server (--server)")
    add_task_options(server)
    server.add_argument(
        "--label-suffix", default="", metavar="SUFFIX", help='e.g. "_NV": write RBC as RBC_NV'
    )
    server.add_argument(
        "--nv", dest="label_suffix", action="store_const", const=UNVALIDATED_SUFFIX,
        help=f"--label-suffix {UNVALIDATED_SUFFIX}: not validated; training leaves these out",
    )
    server.add_argument("--create-labels", action="store_true", help="add missing target labels")
    server.add_argument(
        "--all-frames", action="store_true", help="also annotated frames (nothing is deleted)"
    )
    server.add_argument("--polygons", action="store_true", help="masks as polygons (mask models)")
    server.add_argument(
        "--score-attribute", default="score", metavar="NAME",
        help="task label attribute that receives each score, when the label has it ('' for none; "
        "default: %(default)s)",
    )  # fmt: skip
    server.add_argument("--dry-run", action="store_true", help="print what would be written")


def run(args: argparse.Namespace) -> int:
    from serverless.errors import UserError

    if args.images is not None:
        if args.tasks or args.project is not None or args.dry_run:
            raise UserError("--tasks, --project and --dry-run go with --server, not --images")
        return _run_folder(args)
    if not args.tasks and args.project is None:
        raise UserError("--server needs --tasks IDS or --project ID")
    return _run_server(args)


def _run_folder(args: argparse.Namespace) -> int:
    from serverless.errors import UserError
    from trainer.deploy.export import detector_for, folder_frames
    from trainer.inference import find_images, predict_folder, summary_lines, write_json

    root: Path = args.images
    if not root.is_dir():
        raise UserError(f"--images {root}: not a folder")
    if args.previews and args.previews.resolve() == root.resolve():
        raise UserError(f"--previews {args.previews}: must not be the --images folder")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite to replace it")
    if not find_images(root, exclude=args.previews):
        raise UserError(f"--images {root}: no .jpg/.jpeg/.png/.tif/.tiff/.bmp files found")
    frames = folder_frames(root) if args.engine == "openvino" else None
    detector = detector_for(args.run, args.device, args.engine, frames)
    result = predict_folder(detector, root, threshold=args.threshold, previews=args.previews)
    if not result.coco["images"]:
        raise UserError(f"--images {root}: none of the images could be read")
    write_json(args.out, result.coco)
    for line in summary_lines(result, detector.labels):
        print(line)
    print(f"wrote {args.out}" + (f" and previews in {args.previews}" if args.previews else ""))
    return 0


def _run_server(args: argparse.Namespace) -> int:
    from serverless.errors import UserError
    from trainer.cvat.server import connect
    from trainer.cvat.upload import (
        UploadOptions,
        find_tasks,
        report_lines,
        upload_errors,
        upload_predictions,
    )
    from trainer.deploy.export import detector_for

    options = UploadOptions(
        threshold=args.threshold,
        label_suffix=args.label_suffix,
        all_frames=args.all_frames,
        create_labels=args.create_labels,
        polygons=args.polygons,
        dry_run=args.dry_run,
        score_attribute=args.score_attribute,
    )
    detector = detector_for(args.run, args.device, args.engine)
    if args.polygons and not detector.has_masks:
        raise UserError(f"--polygons: {args.run} is a box model ({detector.info.architecture})")
    with connect(args.server) as client, upload_errors(args.server):
        tasks = find_tasks(client, args.tasks or (), args.project)
        for report in upload_predictions(client, detector, tasks, options):
            for line in report_lines(report, args.dry_run):
                print(line, flush=True)
    if args.dry_run:
        print("dry run: nothing was sent")
    if args.label_suffix and args.label_suffix != UNVALIDATED_SUFFIX:
        print(f"note: train, evaluate and inspect leave these out only with --unvalidated-suffix "
              f"{args.label_suffix} (their default is {UNVALIDATED_SUFFIX})")
    return 0
