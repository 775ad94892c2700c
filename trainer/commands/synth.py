"""Write a synthetic CVAT project export (particles of several shapes on a textured background).

Both formats a CVAT server exports are written: "CVAT for images 1.1" (synth_cvat11.zip) and
"COCO 1.0" (synth_coco10.zip), subsets Train and Validation, plus a few unannotated images.
Same seed -> identical files. Use it to try the whole pipeline without a CVAT server.

examples:
  python -m trainer synth data/ --train 40 --val 10 --shapes mask
  python -m trainer synth data/ --size 640x480 --object-size circle=6-12 --object-size square=60-140
"""

from __future__ import annotations

import argparse

from trainer.commands import non_negative

KINDS = ("circle", "square", "triangle")  # the generator's labels, kept here so --help stays light

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


_count = non_negative(int, "a count")


def _label_range(text: str) -> tuple[str, tuple[float, float]]:
    """"circle=6-12" -> ("circle", (6.0, 12.0))."""
    label, _, span = text.partition("=")
    try:
        low, high = (float(v) for v in span.split("-"))
    except ValueError:
        low = high = -1.0
    if label not in KINDS or not 0 < low <= high:
        kinds = ", ".join(KINDS)
        msg = f"expected LABEL=MIN-MAX with LABEL one of {kinds}, such as circle=6-12, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return label, (low, high)


def _range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split("-"))
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX counts such as 2-6, got {text!r}")
    return low, high


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
    parser.add_argument("--object-size", type=_label_range, action="append", default=[],
                        metavar="LABEL=MIN-MAX",
                        help="diameter range of one label's particles in px (repeatable; default 15-60)")
    parser.add_argument("--objects", type=_range, default=(2, 6), metavar="MIN-MAX",
                        help="particles tried per image (default 2-6)")
    parser.add_argument("--format", choices=["cvat", "coco", "both"], default="both")
    parser.add_argument("--no-zip", action="store_true", help="write folders instead of zips")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from serverless.errors import UserError
    from trainer.data.readers import format_summary, load_dataset

    formats = ("cvat", "coco") if args.format == "both" else (args.format,)
    try:
        written = _generate(args, formats)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for fmt, path in written.items():
        print(f"wrote {path} ({fmt})")
    with tempfile.TemporaryDirectory() as cache:
        data = load_dataset([next(iter(written.values()))], keep_empty=True, cache_dir=cache)
    print(format_summary(data.summary()))
    return 0


def _generate(args: argparse.Namespace, formats: tuple[str, ...]) -> dict:
    from trainer.data.synth import generate

    return generate(
        args.out_dir,
        seed=args.seed,
        train=args.train,
        val=args.val,
        empty=args.empty,
        size=args.size,
        shapes=args.shapes,
        formats=formats,
        zipped=not args.no_zip,
        object_sizes=dict(args.object_size),
        objects=(args.objects[0], args.objects[1] + 1),
    )
