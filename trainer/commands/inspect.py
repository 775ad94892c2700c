"""Show what training would see in CVAT exports: images per subset, objects per label, skips.

Reads the exports exactly as `train` does (same options), without touching a model or decoding an
image (sizes come from file headers), so label names, subsets and skipped shapes can be checked
before spending hours on training. Labels that are no class (tag and skeleton labels, labels with no
object) are listed with the reason; an export without training images is summarised too.

examples:
  python -m trainer inspect bccd_cvat11.zip
  python -m trainer inspect export1.zip export2.zip --labels RBC,WBC --json
"""

from __future__ import annotations

import argparse

from trainer.commands import add_options
from trainer.data.options import DataOptions

HELP = "summarise CVAT exports (images, objects per label, skipped shapes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DataOptions, "data")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json

    from serverless.imageio import pixel_limit
    from trainer.commands import read_options
    from trainer.data.options import largest_image, load_from_args, split_from_args
    from trainer.data.readers import format_summary

    options = read_options(DataOptions, args)
    data = load_from_args(options, require_images=False)
    summary = data.summary()
    summary["split"] = split_from_args(options, data, require_train=False).counts()
    huge, limit = largest_image(data), pixel_limit(data.max_pixels)
    summary["largest_image"] = {"image": huge.identity, "width": huge.width, "height": huge.height}
    summary["max_pixels"] = limit
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(summary))
    pixels = huge.width * huge.height
    over = f", over the limit of {limit}: raise it with --max-pixels {pixels}" if pixels > limit else ""
    print(f"\nlargest image: {huge.identity}, {huge.width}x{huge.height} = {pixels} pixels{over}")
    print("split: " + ", ".join(f"{k} {v}" for k, v in summary["split"].items()))
    if not summary["split"]["train"]:
        print("  no training images: evaluate and crop can use this data; train needs a subset with the "
              "train role (Train, or --subset-map NAME=train)")
    return 0
