"""Accuracy on real data: BCCD blood cells (../shared/datasets/bccd), Train → Validation.

Trains with ``python -m trainer train`` for a fixed budget of epochs and prints validation mAP50 and
mAP next to the published anchor for this dataset (mAP50 0.929, an ImageNet/COCO-pretrained ATSS).
Without network access the run starts from scratch (``--weights none``); with pretrained weights
available pass ``--weights coco``.

    python benchmarks/bench_accuracy_bccd.py --epochs 3                      # CPU, default arch
    python benchmarks/bench_accuracy_bccd.py --device cuda --epochs 40 --weights coco
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from trainer.commands import main as cli

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "bccd_cvat11.zip"
ANCHOR_MAP50 = 0.929


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn_v2")
    p.add_argument("--weights", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=480, help="BCCD frames are 640x480")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="keep the run here (default: a temporary folder)")
    args, extra = p.parse_known_args()
    if not BCCD.exists():
        print(f"error: {BCCD} not found (../shared/datasets/bccd beside the repository)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "bccd")
        start = time.perf_counter()
        code = cli(["train", str(BCCD), "--out", str(out), "--arch", args.arch, "--weights", args.weights,
                    "--device", args.device, "--epochs", str(args.epochs), "--patience", "0",
                    "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                    "--overwrite", *extra])
        if code:
            return code
        minutes = (time.perf_counter() - start) / 60
        result = json.loads((out / "metrics.json").read_text())
        device = json.loads((out / "model.json").read_text())["provenance"]["device"]
    print(f"\nBCCD Validation, {args.arch}, weights {args.weights}, {args.epochs} epochs, "
          f"{minutes:.1f} min on {device}")
    print(f"mAP50 {result['mAP50']:.3f}  mAP {result['mAP']:.3f}  "
          f"(anchor mAP50 {ANCHOR_MAP50}; ratio {result['mAP50'] / ANCHOR_MAP50:.2f})")
    for label, row in result["per_class"].items():
        print(f"  {label:<10} AP50 {row['AP50']:.3f}  AP {row['AP']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
