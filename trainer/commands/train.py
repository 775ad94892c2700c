"""Fine-tune a detector on CVAT exports (or a CVAT server) and write a model bundle.

Examples:
  python -m trainer train project_export.zip --out runs/cells
  python -m trainer train export.zip --labels RBC,WBC --arch fasterrcnn_mobilenet_v3_large_fpn --epochs 30
  python -m trainer train --server https://cvat.example.org --project 12 --out runs/fossils
  python -m trainer train export_v2.zip --weights runs/cells --out runs/cells-v2   # retrain
  python -m trainer train --config train.yaml --out runs/cells --resume
  torchrun --nproc_per_node 4 -m trainer train export.zip --out runs/big              # multi-GPU

Options not given on the command line come from --config (YAML, same names), then the defaults.
"""

from __future__ import annotations

import argparse

from serverless.architectures import ARCHITECTURES, DEFAULT_ARCH
from trainer.training.config import TrainConfig

HELP = "train a detector and write a model bundle (runs/NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.data.options import add_data_arguments

    add_data_arguments(parser)
    d = TrainConfig()
    g = parser.add_argument_group("training")
    g.add_argument("--config", help="YAML file with any of these options (flags override it)")
    g.add_argument("--out", default=d.out, help="run directory for the bundle (default: %(default)s)")
    g.add_argument("--arch", default=DEFAULT_ARCH, help=f"one of: {', '.join(ARCHITECTURES)}")
    g.add_argument("--weights", default=d.weights,
                   help="coco | imagenet | none | previous run dir | state_dict file (default: %(default)s)")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N] (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (default: %(default)s)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without val mAP gain; 0 = never (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per GPU (default: %(default)s)")
    g.add_argument("--image-size", type=int,
                   help="shorter side the model resizes to (default: per architecture)")
    g.add_argument("--max-size", type=int, help="longer-side cap (default: per architecture)")
    g.add_argument("--scale-jitter", type=float, default=d.scale_jitter,
                   help="train on shorter sides down to size*(1-J) (default: %(default)s)")
    g.add_argument("--lr", type=float, help="learning rate (default: 0.02 SGD / 1e-4 AdamW per 16 images)")
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--scheduler", default=d.scheduler, choices=["cosine", "step"])
    g.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm; 0 disables")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on GPU")
    g.add_argument("--augment", default=d.augment, choices=["none", "flip", "microscopy"],
                   help="microscopy adds vertical flips, 90-degree rotations, colour jitter (default)")
    g.add_argument("--detections-per-img", type=int, default=d.detections_per_img,
                   help="most objects reported per image (default: %(default)s)")
    g.add_argument("--roi-batch-size", type=int, default=d.roi_batch_size,
                   help="R-CNN box-head samples per image; lower trains faster (default: %(default)s)")
    g.add_argument("--trainable-backbone-layers", type=int, help="0-5, for pretrained backbones")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: min(4, CPUs))")
    g.add_argument("--cache-images", action="store_true", help="decode every image once, keep in RAM")
    g.add_argument("--tile-size", type=int, help="serve very large frames in tiles of this size")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    from trainer.data.options import load_from_args, split_from_args
    from trainer.data.readers import format_summary
    from trainer.training.config import apply_config_file, config_from_args
    from trainer.training.run import check_run_dir, train

    apply_config_file(args, args._parser)
    config = config_from_args(args)
    check_run_dir(config)
    data = load_from_args(args)
    splits = split_from_args(args, data)
    print(format_summary(data.summary()), flush=True)
    split_options = {"val_fraction": args.val_fraction, "subset_map": dict(args.subset_map)}
    train(config, data, splits, split_options)
    return 0
