"""Accuracy on real data: BCCD blood cells (../shared/datasets/bccd), Train → Validation.

Trains with ``python -m trainer train`` for a fixed budget, of epochs or of wall-clock minutes, and
prints validation mAP50 and mAP next to the published anchor for this dataset (mAP50 0.929, an
ImageNet/COCO-pretrained ATSS). Without network access the run starts from scratch
(``--weights none``); with pretrained weights available pass ``--weights coco``.

A budget of minutes (``--minutes``) is spent so: a one-epoch run, timed line by line, measures the
set-up, one epoch (training and validation) and the finish (calibration, reports, plots); then a
fresh run of as many epochs as fit in what is left, so that its cosine schedule ends on time. With
no room for a second run, the one-epoch run is the result.

    python benchmarks/bench_accuracy_bccd.py --epochs 3                      # CPU, default arch
    python benchmarks/bench_accuracy_bccd.py --device cuda --minutes 4       # a GPU, fixed 4 minutes
    python benchmarks/bench_accuracy_bccd.py --device cuda --epochs 40 --weights coco
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "bccd_cvat11.zip"
ANCHOR_MAP50 = 0.929


def train(argv: list[str], tag: str = "") -> dict[str, float]:
    """Run ``python -m trainer train ARGV`` in a subprocess, echoing its lines (prefixed by ``tag``);
    returns the seconds from start to its plan line, its first epoch line and its end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    marks: dict[str, float] = {}
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, "-m", "trainer", "train", *argv], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=errors)
        for line in process.stdout:
            now = time.perf_counter() - start
            if line.startswith("training "):
                marks.setdefault("plan", now)
            elif line.startswith("epoch "):
                marks.setdefault("epoch", now)
            print(f"{tag}{line}", end="", flush=True)
        if process.wait():
            errors.seek(0)
            raise RuntimeError(f"{tag}training failed:\n{errors.read()[-3000:]}")
    marks["end"] = time.perf_counter() - start
    return marks


def train_for(minutes: float, argv: list[str], out: Path, tag: str = "") -> int:
    """Spend ``minutes`` (module docstring); returns the epochs of the run that is the result."""
    budget = minutes * 60
    probe = train([*argv, "--out", str(out), "--epochs", "1", "--overwrite"], tag)
    epoch = probe["epoch"] - probe["plan"]
    fixed = probe["end"] - epoch
    epochs = int((budget - probe["end"] - fixed) // epoch)
    if epochs < 2:
        return 1
    train([*argv, "--out", str(out), "--epochs", str(epochs), "--overwrite"], tag)
    return epochs


def result(out: Path) -> dict:
    """Validation metrics of the bundle in ``out`` and the device it was trained on."""
    metrics = json.loads((out / "metrics.json").read_text())
    provenance = json.loads((out / "model.json").read_text())["provenance"]
    return {**metrics, "device": provenance["device"], "precision": provenance.get("precision")}


def _fmt(value: float | None) -> str:
    return "    -" if value is None else f"{value:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=BCCD, help="BCCD 'CVAT for images 1.1' zip")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn_v2")
    p.add_argument("--weights", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--minutes", type=float, help="wall-clock budget instead of --epochs")
    p.add_argument("--image-size", type=int, default=480, help="BCCD frames are 640x480")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="keep the run here (default: a temporary folder)")
    args, extra = p.parse_known_args()
    if not args.data.exists():
        print(f"error: {args.data} not found (pass --data; ../shared/datasets/bccd)", file=sys.stderr)
        return 2
    argv = [str(args.data), "--arch", args.arch, "--weights", args.weights, "--device", args.device,
            "--patience", "0", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "bccd")
        start = time.perf_counter()
        if args.minutes is not None:
            epochs = train_for(args.minutes, argv, out)
        else:
            epochs = args.epochs
            train([*argv, "--out", str(out), "--epochs", str(epochs), "--overwrite"])
        minutes = (time.perf_counter() - start) / 60
        found = result(out)
    print(f"\nBCCD Validation, {args.arch}, weights {args.weights}, {epochs} epochs, "
          f"{minutes:.1f} min on {found['device']}, {found['precision']}")
    print(f"mAP50 {found['mAP50']:.3f}  mAP {found['mAP']:.3f}  "
          f"(anchor mAP50 {ANCHOR_MAP50}; ratio {found['mAP50'] / ANCHOR_MAP50:.2f})")
    for label, row in found["per_class"].items():  # AP is None for a class without ground truth
        print(f"  {label:<10} AP50 {_fmt(row['AP50'])}  AP {_fmt(row['AP'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
