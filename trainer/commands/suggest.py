"""Rank unannotated frames by how much a human label on them would teach the model.

Every frame nobody has annotated yet (CVAT tasks: no shape, tag or track; a folder: every image)
goes through the model as it is and mirrored. A frame ranks high when its detections sit near the
calibrated thresholds (uncertainty) or the mirrored view does not confirm them (disagreement), and
when it looks unlike the frames ranked above it (diversity: the model's own backbone features),
so ten near-identical frames are not all suggested. Writes a ranked CSV (rank, task, frame,
image, priority and its parts) and prints the top of it.

--mark N tags the N best frames of the tasks with the tag label "annotate-next" (created when the
task or its project lacks it): in CVAT, Filters -> Label == annotate-next, then the arrow keys go
from one suggested frame to the next. Tags are not annotations to training, predict or suggest.

examples:
  python -m trainer suggest runs/cells --images new_slides/ --out next.csv
  python -m trainer suggest runs/cells --server https://cvat.example.org --project 4 --mark 20 --dry-run
  python -m trainer suggest runs/cells --server https://cvat.example.org --tasks 15,16 --mark 20
  python -m trainer suggest runs/cells --images new_slides/ --diversity 0 --json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trainer.commands import add_model_options, add_task_options, non_negative

HELP = "rank unannotated frames by what a label on them would teach the model (active learning)"


_count = non_negative(int, "a number of frames")
_weight = non_negative(float, "a weight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="trained run (bundle) directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", type=Path, help="folder of images (recursive)")
    source.add_argument("--server", metavar="URL", help="CVAT server whose tasks to rank")
    add_task_options(parser)
    add_model_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("suggestions.csv"), help="ranked CSV (%(default)s)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    out.add_argument("--top", type=_count, default=10, metavar="N", help="rows to print (%(default)s)")
    out.add_argument("--json", action="store_true", help="print the top rows as one JSON object")
    out.add_argument(
        "--diversity", type=_weight, default=1.0, metavar="W",
        help="weight of novelty against uncertainty: 0 ranks by uncertainty alone (%(default)s)",
    )  # fmt: skip
    mark = parser.add_argument_group("marking in CVAT (--server)")
    mark.add_argument("--mark", type=_count, default=0, metavar="N",
                      help="tag the N best frames 'annotate-next' in their tasks")  # fmt: skip
    mark.add_argument("--dry-run", action="store_true", help="say what --mark would tag; send nothing")


def run(args: argparse.Namespace) -> int:
    from serverless.detector import Detector
    from serverless.errors import UserError

    if args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.images is not None:
        if args.tasks or args.project is not None or args.mark or args.dry_run:
            raise UserError("--tasks, --project, --mark and --dry-run go with --server, not --images")
        if not args.images.is_dir():
            raise UserError(f"--images {args.images}: not a folder")
        return _finish(args, *_rank_folder(args, Detector(args.run, args.device)), marks=None)
    if not args.tasks and args.project is None:
        raise UserError("--server needs --tasks IDS or --project ID")
    return _run_server(args, Detector(args.run, args.device))


def _rank_folder(args: argparse.Namespace, detector: Any) -> tuple[list, list[str], Any]:
    from serverless.errors import UserError
    from serverless.imageio import read_image
    from trainer.evaluation.suggest import rank, score_frames
    from trainer.inference import find_images

    paths = find_images(args.images)
    if not paths:
        raise UserError(f"--images {args.images}: no .jpg/.jpeg/.png/.tif/.tiff/.bmp files found")
    scored, failed = _split(score_frames(detector, paths, read_image, args.threshold))
    if not scored:
        raise UserError(f"--images {args.images}: none of the images could be read")
    root = args.images

    def describe(path: Path) -> tuple:
        return "", "", path.relative_to(root).as_posix()

    return rank(scored, args.diversity), failed, describe


def _run_server(args: argparse.Namespace, detector: Any) -> int:
    from trainer.cvat.mark import mark_frames, mark_lines
    from trainer.cvat.server import connect
    from trainer.cvat.upload import fetch_frame, task_frames, upload_errors
    from trainer.evaluation.suggest import rank, score_frames

    with connect(args.server) as client, upload_errors(args.server):
        tasks, items = task_frames(client, args.tasks or (), args.project, all_frames=False)

        def read(item: tuple) -> Any:
            return fetch_frame(tasks[item[0]], item[1])

        scored, failed = _split(score_frames(detector, items, read, args.threshold))
        ranking = rank(scored, args.diversity)
        marks = None
        if args.mark:
            picks = [(s.item[0], s.item[1]) for s in ranking[: args.mark]]
            marks = mark_lines(mark_frames(client, tasks, picks, args.dry_run), args.dry_run)
    return _finish(args, ranking, failed, lambda item: item, marks)


def _split(results: Any) -> tuple[list, list[str]]:
    scored, failed = [], []
    for item, result in results:
        if isinstance(result, Exception):
            failed.append(str(result))
        else:
            scored.append((item, result))
    return scored, failed


def _finish(args: argparse.Namespace, ranking: list, failed: list[str], describe: Any,
            marks: list[str] | None) -> int:  # fmt: skip
    import json

    from trainer.evaluation.suggest import write_csv

    write_csv(args.out, ranking, describe)
    rows = [_row(s, describe) for s in ranking[: args.top]]
    if args.json:
        print(json.dumps({"csv": str(args.out), "frames": len(ranking), "skipped": failed,
                          "top": rows, "marked": marks or []}, indent=2))  # fmt: skip
        return 0
    print(f"ranked {len(ranking)} unannotated frame(s); top {len(rows)}:")
    print(f"  {'rank':>4}  {'priority':>8}  {'uncert.':>7}  {'disagr.':>7}  {'novelty':>7}  frame")
    for r in rows:
        where = f"task {r['task']} frame {r['frame']} {r['image']}".strip() if r["task"] else r["image"]
        print(f"  {r['rank']:>4}  {r['priority']:>8.3f}  {r['uncertainty']:>7.3f}  "
              f"{r['disagreement']:>7.3f}  {r['novelty']:>7.3f}  {where}")  # fmt: skip
    for reason in failed:
        print(f"skipped {reason}")
    for line in marks or []:
        print(line)
    if args.dry_run:
        print("dry run: nothing was sent")
    print(f"wrote {args.out}")
    return 0


def _row(s: Any, describe: Any) -> dict[str, Any]:
    task, frame, image = describe(s.item)
    return {"rank": s.rank, "task": task, "frame": frame, "image": image,
            "priority": round(s.priority, 4), "informativeness": round(s.score.informativeness, 4),
            "uncertainty": round(s.score.uncertainty, 4), "disagreement": round(s.score.disagreement, 4),
            "novelty": round(s.novelty, 4), "detections": s.score.detections}  # fmt: skip
