"""The sub-commands of ``python -m trainer`` / ``cvat-detector``, one module each, and the entry point.

A new command is a module here exposing ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
Command modules are imported only when the parser is built and keep heavy imports inside ``run`` so
that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from serverless.errors import USER_ERRORS
from trainer import __version__

#: Listing order of the sub-commands (modules of this package).
ORDER = ["demo", "synth", "inspect", "train", "evaluate", "package", "predict", "crop"]


def command_names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__)}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvat-detector",
        description="Train detectors on CVAT annotations, serve them to CVAT, export object crops.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_names():
        module = importlib.import_module(f"trainer.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def crop_main() -> int:
    """Console script ``cvat-detector-crop``: the crop exporter on its own."""
    return main(["crop", *sys.argv[1:]])
