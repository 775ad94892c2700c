"""Active learning: annotating the frames ``suggest`` picks against annotating random frames.

A generated project stands in for a real one: a pool of unannotated frames where most hold only
circles and squares and a few also hold triangles (the rare class a scientist most needs more
examples of), plus held-out validation and test images with all three.

1. A starting set of ``--initial`` random pool frames is "annotated" and a model M0 is trained on
   it from scratch (no pretrained weights can be downloaded here).
2. ``suggest``'s ranking of the rest of the pool with M0 (``score_frames`` and ``rank`` of
   :mod:`trainer.evaluation.suggest`, the command's own code) gives ``--budget`` frames to annotate.
3. For each seed, the same number of frames is drawn at random from the rest of the pool, and both
   sets are added to the start and retrained from M0 (``--weights M0``, as a user retrains) with
   that seed and the same schedule, then scored by COCO mAP50 on the test images (the retrained
   runs skip validation: only the test score is used, and M0's thresholds are what ``suggest``
   needs calibrated).

Prints both mAP50s per seed and their means in one run; the ratio suggested / random is the
figure (> 1: the suggestions teach more). CPU: 160x120 images seen at 192 px (the smallest anchor
of the architecture is 32 px), the box head sampling 16 regions per image: about 6 minutes of one
core, over 15 minutes on the shared 2-core machine under load 10 (docs/benchmarks.md).
``--threads 1`` (the default) keeps a loaded machine from stalling in thread spin-waits.

    python benchmarks/bench_suggest.py
    python benchmarks/bench_suggest.py --seeds 5 --budget 12 --threads 2
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from serverless.detector import Detector
from serverless.imageio import read_image
from trainer.data.readers import load_dataset
from trainer.data.records import DetectionData, ImageRecord
from trainer.data.splits import Split, SplitOptions
from trainer.data.synth import generate
from trainer.evaluation.metrics import evaluate_detections, predict_records
from trainer.evaluation.suggest import rank, score_frames
from trainer.training.config import TrainConfig
from trainer.training.run import train

LABELS = ["circle", "square", "triangle"]


def make_project(root: Path, args: argparse.Namespace) -> tuple[list, list, list]:
    """(pool, val, test) records: common frames without triangles, rare ones with them."""
    size = (160, 120)
    common = generate(root / "common", seed=11, train=args.common, val=0, empty=0, size=size,
                      labels=LABELS[:2], formats=("cvat",))["cvat"]  # fmt: skip
    rare = generate(root / "rare", seed=12, train=args.rare, val=args.val + args.test, empty=0,
                    size=size, labels=LABELS, formats=("cvat",))["cvat"]  # fmt: skip
    pool, held_out = [], []
    for source, export in (("common", common), ("rare", rare)):
        for im in load_dataset([export]).images:
            im.source = source
            (pool if im.subset == "Train" else held_out).append(im)
    return pool, held_out[: args.val], held_out[args.val :]


def fit(out: Path, records: list[ImageRecord], val: list, args, seed: int, weights: str, epochs: int):
    """Train (quietly) and return the run directory."""
    config = TrainConfig(
        out=str(out), arch="fasterrcnn_mobilenet_v3_large_fpn", weights=weights, device="cpu",
        epochs=epochs, patience=0, batch_size=4, image_size=args.size, lr=args.lr,
        warmup_iters=20, roi_batch_size=args.roi, workers=0, augment="flip", seed=seed, overwrite=True,
    )  # fmt: skip
    data = DetectionData(labels=list(LABELS), images=records + val)
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):  # progress bars and epoch lines
        train(config, data, Split(SplitOptions(seed=seed), {"train": records, "val": val}))
    return out


def test_map50(run: Path, test: list) -> float:
    detector = Detector(run, "cpu")
    gts, preds = predict_records(detector, test, progress=False)
    return evaluate_detections(gts, preds, LABELS).mAP50


def suggested(run: Path, candidates: list, budget: int) -> list:
    detector = Detector(run, "cpu")
    scored = [(im, s) for im, s in score_frames(detector, candidates, lambda im: read_image(im.path),
                                                progress=False)]  # fmt: skip
    return [s.item for s in rank(scored)[:budget]]


def compare(root: Path, start: list, rest: list, test: list, picked: list, args,
            seed: int) -> tuple[float, float]:  # fmt: skip
    """(suggested, random) test mAP50 after retraining from M0 with ``seed``."""
    m0 = root / "m0"
    draws = {"suggested": picked, "random": random.Random(seed).sample(rest, args.budget)}
    result = {}
    for name, added in draws.items():
        run = fit(root / f"{name}-{seed}", start + added, [], args, seed, str(m0), args.retrain_epochs)
        result[name] = test_map50(run, test)
        rare = sum(any(s.label == "triangle" for s in im.shapes) for im in added)
        print(f"  seed {seed} {name:>9}: {rare}/{len(added)} added frames hold triangles, "
              f"test mAP50 {result[name]:.3f}", flush=True)  # fmt: skip
    return result["suggested"], result["random"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--common", type=int, default=32, help="pool frames without triangles")
    parser.add_argument("--rare", type=int, default=8, help="pool frames with triangles")
    parser.add_argument("--val", type=int, default=4, help="M0's validation images (calibration)")
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--initial", type=int, default=16)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=14, help="epochs of M0, from scratch")
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=192, help="shorter side the model sees")
    parser.add_argument("--roi", type=int, default=16, help="box-head samples per image")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (%(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool, val, test = make_project(root, args)
        start_set = random.Random(1000).sample(pool, args.initial)
        rest = [im for im in pool if im not in start_set]
        print(f"pool {len(pool)} frames ({args.rare} with triangles), val {len(val)}, test {len(test)}; "
              f"start {args.initial}, +{args.budget} annotated; seeds {args.seeds}", flush=True)  # fmt: skip
        m0 = fit(root / "m0", start_set, val, args, 0, "none", args.epochs)
        picked = suggested(m0, rest, args.budget)
        print(f"M0 test mAP50 {test_map50(m0, test):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        results = [compare(root, start_set, rest, test, picked, args, seed)
                   for seed in range(args.seeds)]  # fmt: skip
    ours, rand = (np.array(x) for x in zip(*results, strict=True))
    print(f"mean test mAP50: suggested {ours.mean():.3f} (±{ours.std():.3f}), "
          f"random {rand.mean():.3f} (±{rand.std():.3f}); ratio {ours.mean() / max(rand.mean(), 1e-9):.2f}; "
          f"suggested better in {int((ours > rand).sum())}/{len(ours)} seeds; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
