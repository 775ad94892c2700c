"""Show what training would see in CVAT exports: images per subset, objects per label, skips.

Reads the exports exactly as `train` does (same options), without touching a model, so label
names, subsets and skipped shapes can be checked before spending hours on training.

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

    from trainer.commands import read_options
    from trainer.data.options import load_from_args, split_from_args
    from trainer.data.readers import format_summary
    from trainer.data.readers.labels import unvalidated_note

    options = read_options(DataOptions, args)
    data = load_from_args(options, require_images=False)
    summary = data.summary()
    summary["split"] = split_from_args(options, data).counts()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if note := unvalidated_note(data.skipped, options.unvalidated_suffix):
            print(f"\n{note}")
        print("\nsplit: " + ", ".join(f"{k} {v}" for k, v in summary["split"].items()))
    return 0
