"""Show what training would see in CVAT exports: images per subset, objects per label, skips,
and the objects' sizes.

Reads the exports exactly as `train` does (same options), without touching a model or decoding an
image (sizes come from file headers), so label names, subsets and skipped shapes can be checked
before spending hours on training. Labels that are no class (tag and skeleton labels, labels with no
object) are listed with the reason; an export without training images is summarised too. The size
table gives, per label of the training split, the shorter side in the source and after the model's
resize and the aspect ratio (min / median / p95), the input size and anchors `train` would choose
for --arch, and a warning for objects too small for it to detect well.

examples:
  python -m trainer inspect bccd_cvat11.zip
  python -m trainer inspect export1.zip export2.zip --labels RBC,WBC --json
  python -m trainer inspect slides.zip --arch fasterrcnn_mobilenet_v3_large_fpn --image-size 512
"""

from __future__ import annotations

import argparse

from trainer.commands import add_options
from trainer.data.options import DataOptions
from trainer.training.config import TrainConfig

HELP = "summarise CVAT exports (images, objects per label and their sizes, skipped shapes)"
#: The training options that decide how large objects are for the network.
SIZE_OPTIONS = ("arch", "image_size", "max_size", "anchors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DataOptions, "data")
    add_options(parser, TrainConfig, "object sizes as `train` would see them", only=SIZE_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json

    from serverless.architectures import get_architecture
    from serverless.imageio import pixel_limit
    from trainer.commands import read_options
    from trainer.data.options import largest_image, load_from_args, split_from_args
    from trainer.data.readers import format_summary
    from trainer.training import anchors

    options = read_options(DataOptions, args)
    config = read_options(TrainConfig, args)
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
