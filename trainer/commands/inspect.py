"""Show what training would see in CVAT exports, or what a trained run saw.

Reads the exports exactly as `train` does (same options), without touching a model or decoding an
image (sizes come from file headers), so label names, subsets, skipped shapes (including
unvalidated "_NV" pre-annotations) and the split can be checked before spending hours on training.
Labels that are no class (tag and skeleton labels, labels with no object) are listed with the
reason; an export without training images is summarised too. The size table gives, per label of
the training split, the shorter side in the source and after the model's resize and the aspect
ratio (min / median / p95), the input size and anchors `train` would choose for --arch, and a
warning for objects too small for it to detect well. Given a run directory instead, it tells which
annotations the model saw: the exports or the CVAT server (project/tasks, when they were read),
what it started from, its parent runs, its split and what was left out.

examples:
  python -m trainer inspect bccd_cvat11.zip
  python -m trainer inspect export1.zip export2.zip --labels RBC,WBC --json
  python -m trainer inspect slides.zip --arch fasterrcnn_mobilenet_v3_large_fpn --image-size 512
  python -m trainer inspect --server https://cvat.example.org --project 12
  python -m trainer inspect runs/bccd-v2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.commands import add_options
from trainer.data.options import DataOptions
from trainer.training.config import TrainConfig

HELP = "summarise CVAT exports (images, objects per label and their sizes, skipped shapes) or a trained run"
#: The training options that decide how large objects are for the network.
SIZE_OPTIONS = ("arch", "image_size", "max_size", "anchors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DataOptions, "data")
    add_options(parser, TrainConfig, "object sizes as `train` would see them", only=SIZE_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from serverless.architectures import get_architecture
    from serverless.bundle import MODEL_JSON
    from serverless.imageio import pixel_limit
    from trainer.commands import read_options
    from trainer.data.options import largest_image, load_from_args, split_from_args
    from trainer.data.readers import format_summary
    from trainer.data.readers.labels import unvalidated_note
    from trainer.training import anchors

    options = read_options(DataOptions, args)
    config = read_options(TrainConfig, args)
    runs = [d for d in options.data if (Path(d) / MODEL_JSON).is_file()]
    for run_dir in runs:
        print(json.dumps(_run_summary(run_dir), indent=2) if args.json else _format_run(run_dir))
    options = replace(options, data=[d for d in options.data if d not in runs])
    if runs and not (options.data or options.server):
        return 0
    data = load_from_args(options, require_images=False)
    summary = data.summary()
    split = split_from_args(options, data, require_train=False)
    summary["split"] = split.counts()
    huge, limit = largest_image(data), pixel_limit(data.max_pixels)
    summary["largest_image"] = {"image": huge.identity, "width": huge.width, "height": huge.height}
    summary["max_pixels"] = limit
    sizing = anchors.choose(get_architecture(config.arch), split["train"], data.labels,
                            image_size=config.image_size, max_size=config.max_size, anchors=config.anchors)
    summary["object_sizes"] = sizing.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(summary))
    if note := unvalidated_note(data.skipped, options.unvalidated_suffix):
        print(f"\n{note}")
    pixels = huge.width * huge.height
    over = f", over the limit of {limit}: raise it with --max-pixels {pixels}" if pixels > limit else ""
    print(f"\nlargest image: {huge.identity}, {huge.width}x{huge.height} = {pixels} pixels{over}")
    print("split: " + ", ".join(f"{k} {v}" for k, v in summary["split"].items()))
    if not summary["split"]["train"]:
        print("  no training images: evaluate and crop can use this data; train needs a subset with the "
              "train role (Train, or --subset-map NAME=train)")
        return 0
    print("\n" + anchors.format_sizing(sizing))
    return 0


def _run_summary(run_dir: str) -> dict:
    from serverless.bundle import load_info

    info = load_info(run_dir)
    return {"run": run_dir, "architecture": info.architecture, "labels": info.labels,
            "structure": info.structure, "threshold": info.threshold,
            "class_thresholds": info.class_thresholds, "provenance": info.provenance}


def _format_run(run_dir: str) -> str:
    from serverless.bundle import SPLIT_JSON, load_info
    from trainer.data.splits import read_split
    from trainer.evaluation.report import bundle_thresholds, provenance_lines

    info = load_info(run_dir)
    validation = info.metrics.get("validation") or {}
    lines = [f"{run_dir}: {info.architecture}, labels {', '.join(info.labels)}",
             *provenance_lines(info.provenance), f"  thresholds: {bundle_thresholds(info)}"]
    skipped = info.provenance.get("data", {}).get("skipped", {})
    if skipped:
        lines.append("  left out: " + ", ".join(f"{n} x {reason}" for reason, n in skipped.items()))
    recorded = read_split(run_dir)
    if recorded is None:
        lines.append(f"  split: not recorded (no {SPLIT_JSON}: an older run)")
    else:
        counts = ", ".join(f"{role} {len(ids)}" for role, ids in recorded.roles.items())
        lines.append(f"  split: {counts} ({SPLIT_JSON})")
    if validation:
        lines.append(f"  validation: mAP {validation['mAP']:.3f}, mAP50 {validation['mAP50']:.3f}")
    lines += [f"  note: {note}" for note in info.metrics.get("notes", [])]
    return "\n".join(lines)
