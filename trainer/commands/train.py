"""Fine-tune a detector on CVAT exports (or a CVAT server) and write a model bundle.

Examples:
  python -m trainer train project_export.zip --out runs/cells
  python -m trainer train export.zip --labels RBC,WBC --arch fasterrcnn_mobilenet_v3_large_fpn --epochs 30
  python -m trainer train --server https://cvat.example.org --project 12 --out runs/fossils
  python -m trainer train export_v2.zip --weights runs/cells --out runs/cells-v2   # retrain
  python -m trainer train export.zip --val-fraction 0 --epochs 20   # no validation: keeps the last epoch
  python -m trainer train --config train.yaml --out runs/cells --resume
  torchrun --nproc_per_node 4 -m trainer train export.zip --out runs/big              # multi-GPU

Options not given on the command line come from --config (YAML, same names), then the defaults.

Images no CVAT subset places get their role from a stable hash of their name, so a grown export
keeps every earlier image in its role; a retrain (--weights RUN) keeps every role its parent run
recorded. Pre-annotations under "_NV" labels (predict --nv) stay out until validated.
"""

from __future__ import annotations

import argparse

from trainer.commands import add_options
from trainer.data.options import DataOptions
from trainer.training.config import TrainConfig

HELP = "train a detector and write a model bundle (runs/NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DataOptions, "data")
    parser.add_argument("--config", help="YAML file with any of these options (flags override it)")
    add_options(parser, TrainConfig, "training")


def options(args: argparse.Namespace) -> tuple[DataOptions, TrainConfig]:
    """The data and training options: defaults < --config file < flags given."""
    from trainer.commands import check_config_keys, load_config, read_options

    config = load_config(args.config) if args.config else {}
    check_config_keys(args.config, config, DataOptions, TrainConfig)
    return read_options(DataOptions, args, config), read_options(TrainConfig, args, config)


def run(args: argparse.Namespace) -> int:
    from trainer.data.options import load_from_args, split_from_args
    from trainer.data.readers import format_summary
    from trainer.data.readers.labels import unvalidated_note
    from trainer.training.run import check_run_dir, train

    data_options, config = options(args)
    check_run_dir(config)
    parent = parent_split(config.weights)
    data = load_from_args(data_options)
    split = split_from_args(data_options, data, config.seed, parent, config.weights)
    print(format_summary(data.summary()), flush=True)
    if note := unvalidated_note(data.skipped, data_options.unvalidated_suffix):
        print(note, flush=True)
    for note, count in split.notes.items():
        print(f"split: {count} {note}", flush=True)
    train(config, data, split)
    return 0


def parent_split(weights: str):
    """The recorded split of a parent run (``--weights RUN``), whose roles a retraining keeps."""
    from pathlib import Path

    from serverless.bundle import MODEL_JSON, SPLIT_JSON
    from trainer.data.splits import read_split

    if not (Path(weights) / MODEL_JSON).is_file():
        return None
    recorded = read_split(weights)
    if recorded is None:
        print(f"note: {weights} recorded no {SPLIT_JSON} (an older run): the images it validated on "
              "cannot be kept out of training", flush=True)
    return recorded
