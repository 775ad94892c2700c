"""Small objects: torchvision's default priors against priors and input scale fitted to the data.

Generates one project of small and large particles (spores: discs of 6-12 px; cells: squares of 30-60
px; 160x120 frames, so that a CPU trains it in minutes), then trains the same architecture from
scratch, in this process, one variant after the other, with the same data, epochs, batch, learning
rate and seed:

- ``default``: torchvision's anchors at the frames' own size (``--anchors default --image-size 120``),
  what training did before sizes were fitted, at the input size a CPU user picks;
- ``anchors``: anchors fitted to the training boxes at that same size (``--anchors auto``);
- ``auto``: anchors fitted and the input scale chosen from the data (``--anchors auto --image-size
  auto``, the defaults), which enlarges the frames until the spores are large enough to detect.

Prints validation AP50 per COCO size bucket (small < 32² px², medium < 96², large) and per label for
each variant, with the ratio to ``default``. ``--bccd`` does the same on the BCCD blood cells
(../shared/datasets/bccd; Platelets are its small objects). Figures: docs/benchmarks.md.

    python benchmarks/bench_small_objects.py --variants default,auto     # an idle CPU or a GPU
    python benchmarks/bench_small_objects.py --device cuda --frame 320x240 --epochs 12
    python benchmarks/bench_small_objects.py --bccd --epochs 2 --variants default,auto
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from trainer.commands import main as cli
from trainer.data.synth import generate

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "bccd_cvat11.zip"
VARIANTS = {"default": ["--anchors", "default"], "anchors": ["--anchors", "auto"],
            "auto": ["--anchors", "auto", "--image-size", "auto"]}
BUCKETS = ("small", "medium", "large")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fasterrcnn_mobilenet_v3_large_fpn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=24, help="generated training images")
    p.add_argument("--val", type=int, default=12, help="generated validation images")
    p.add_argument("--frame", default="160x120", help="generated frames' WxH")
    p.add_argument("--variants", default="default,anchors,auto", help=f"some of {', '.join(VARIANTS)}")
    p.add_argument("--bccd", action="store_true", help="BCCD instead of the generated project")
    p.add_argument("--native-size", type=int, help="--image-size of the fixed-size variants "
                   "(default: the frames' shorter side; 480 on BCCD)")
    args, extra = p.parse_known_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}")
    if args.bccd and not BCCD.exists():
        print(f"error: {BCCD} not found (../shared/datasets/bccd beside the repository)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        frame = tuple(int(v) for v in args.frame.split("x"))
        data = BCCD if args.bccd else make_project(Path(tmp), args, frame)
        native = args.native_size or (480 if args.bccd else min(frame))
        name = "BCCD" if args.bccd else "generated project"
        print(f"{name}: {args.arch} from scratch, {args.epochs} epochs, device {args.device}, "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        rows = {v: train_variant(v, data, Path(tmp) / v, args, native, extra) for v in variants}
    print_table(rows, variants)
    return 0


def make_project(folder: Path, args: argparse.Namespace, frame: tuple[int, int]) -> Path:
    cells = (min(frame) / 4, min(frame) / 2)  # 30-60 px on 160x120 frames
    return generate(folder / "data", seed=7, train=args.train, val=args.val, empty=0, size=frame,
                    labels=("spore", "cell"), object_sizes={"spore": (6, 12), "cell": cells},
                    objects=(6, 13), formats=("cvat",))["cvat"]


def train_variant(variant: str, data: Path, out: Path, args: argparse.Namespace, native: int,
                  extra: list[str]) -> dict:
    size = [] if variant == "auto" else ["--image-size", str(native)]
    argv = ["train", str(data), "--out", str(out), "--arch", args.arch, "--weights", "none",
            "--device", args.device, "--epochs", str(args.epochs), "--patience", "0", "--batch-size", "4",
            "--lr", "0.02", "--warmup-iters", "50", "--roi-batch-size", "128", "--seed", "0",
            *VARIANTS[variant], *size, *extra]
    print(f"\n== {variant}: python -m trainer {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    if cli(argv):
        raise SystemExit(f"training the {variant} variant failed")
    metrics = json.loads((out / "metrics.json").read_text())
    sizing = json.loads((out / "model.json").read_text())["provenance"]["sizing"]
    return {"minutes": (time.perf_counter() - start) / 60, "metrics": metrics, "sizing": sizing}


def print_table(rows: dict[str, dict], variants: list[str]) -> None:
    labels = list(next(iter(rows.values()))["metrics"]["per_class"])
    head = ["variant", "input", "anchors", "min", "mAP50", *(f"AP50 {b}" for b in BUCKETS), *labels]
    table = [head]
    for v in variants:
        m, s = rows[v]["metrics"], rows[v]["sizing"]
        anchors = _anchor_span(s)
        table.append([v, str(s["image_size"]), anchors, f"{rows[v]['minutes']:.1f}", _num(m["mAP50"]),
                      *(_num(m["per_area"][b]["AP50"]) for b in BUCKETS),
                      *(_num(m["per_class"][name]["AP50"]) for name in labels)])
    base = rows.get("default")
    if base:
        for v in variants[1:] if variants[0] == "default" else []:
            m, b = rows[v]["metrics"], base["metrics"]
            table.append([f"{v}/default", "", "", f"{rows[v]['minutes'] / base['minutes']:.1f}x",
                          _ratio(m["mAP50"], b["mAP50"]),
                          *(_ratio(m["per_area"][k]["AP50"], b["per_area"][k]["AP50"]) for k in BUCKETS),
                          *(_ratio(m["per_class"][n]["AP50"], b["per_class"][n]["AP50"]) for n in labels)])
    gts = next(iter(rows.values()))["metrics"]
    print("\nvalidation objects: " + ", ".join(f"{b} {gts['per_area'][b]['gt']}" for b in BUCKETS) + "; "
          + ", ".join(f"{n} {gts['per_class'][n]['gt']}" for n in labels))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for row in table:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in pairs]
        print("  ".join(cells))


def _anchor_span(sizing: dict) -> str:
    anchors = sizing["anchors"]
    if anchors is None:
        return "torchvision"
    sizes = [s for level in anchors["sizes"] for s in level] if "sizes" in anchors else anchors["scales"]
    return f"{min(sizes):g}-{max(sizes):g} fitted"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return f"{value / base:.2f}x" if base > 0 else ("inf" if value > 0 else "-")


if __name__ == "__main__":
    sys.exit(main())
