"""Write a synthetic CVAT project export (particles of several shapes on a textured background).

Both formats a CVAT server exports are written: "CVAT for images 1.1" (synth_cvat11.zip) and
"COCO 1.0" (synth_coco10.zip), subsets Train and Validation, plus a few unannotated images.
Same seed -> identical files. Use it to try the whole pipeline without a CVAT server.

example:
  python -m trainer synth data/ --train 40 --val 10 --shapes mask
"""

from __future__ import annotations

import argparse

HELP = "write a synthetic CVAT export (for demos and tests)"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"expected WIDTHxHEIGHT such as 320x240, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"images must be at least 64x64, got {text!r}")
    return width, height


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the exports into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train", type=_count, default=24, help="annotated Train images")
    parser.add_argument("--val", type=_count, default=8, help="annotated Validation images")
    parser.add_argument("--empty", type=_count, default=4, help="unannotated images (both subsets)")
    parser.add_argument("--size", type=_size, default=(320, 240), help="WxH (default 320x240)")
    parser.add_argument(
        "--shapes",
        choices=["box", "polygon", "mask", "mixed"],
        default="box",
        help="annotation shapes: box, polygon, mask, or mixed (all CVAT shape kinds)",
    )
    parser.add_argument("--format", choices=["cvat", "coco", "both"], default="both")
    parser.add_argument("--no-zip", action="store_true", help="write folders instead of zips")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from trainer.data.readers import format_summary, load_dataset
    from trainer.data.synth import generate

    formats = ("cvat", "coco") if args.format == "both" else (args.format,)
    written = generate(
        args.out_dir,
        seed=args.seed,
        train=args.train,
        val=args.val,
        empty=args.empty,
        size=args.size,
        shapes=args.shapes,
        formats=formats,
        zipped=not args.no_zip,
    )
    for fmt, path in written.items():
        print(f"wrote {path} ({fmt})")
    with tempfile.TemporaryDirectory() as cache:
        data = load_dataset([next(iter(written.values()))], keep_empty=True, cache_dir=cache)
    print(format_summary(data.summary()))
    return 0
