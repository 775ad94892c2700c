"""The whole loop on a built-in example, on CPU, in a few minutes.

Generates a synthetic CVAT project export (both "CVAT for images 1.1" and "COCO 1.0"), trains a small
detector on it, evaluates it on the COCO copy, packages the Nuclio function, calls the function's
handler on a held-out frame exactly as CVAT does, runs folder inference, and exports crops.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import time
from pathlib import Path

HELP = "run the whole loop on a generated example (train, evaluate, package, serve, crop)"

#: A small, fast network and budget that learn the synthetic particles on two CPU cores.
DEMO_TRAIN = [
    "--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--weights", "none", "--image-size", "256",
    "--roi-batch-size", "128", "--batch-size", "4", "--lr", "0.02", "--warmup-iters", "50",
    "--patience", "0",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="working folder, replaced on each run")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=48, help="generated training images")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")


def run(args: argparse.Namespace) -> int:
    from serverless.bundle import METRICS_JSON
    from trainer.commands import main

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    data, run_dir, function = out / "data", out / "runs" / "demo", out / "function"
    start = time.perf_counter()
    steps = [
        ("generate a synthetic CVAT project export", ["synth", str(data), "--seed", "0",
         "--train", str(args.train_images), "--val", "16", "--empty", "4"]),
        ("inspect the COCO 1.0 copy", ["inspect", str(data / "synth_coco10.zip")]),
        ("train on the CVAT 1.1 copy", ["train", str(data / "synth_cvat11.zip"), "--out", str(run_dir),
         "--epochs", str(args.epochs), "--device", args.device, *DEMO_TRAIN]),
        ("evaluate on the COCO 1.0 copy's Validation subset",
         ["evaluate", str(run_dir), str(data / "synth_coco10.zip"), "--device", args.device]),
        ("package the Nuclio function (CPU variant)",
         ["package", str(run_dir), "--out", str(function), "--name", "demo-particles", "--cpu"]),
    ]
    total = len(steps) + 3
    for number, (title, argv) in enumerate(steps, start=1):
        _banner(number, total, title, argv)
        if code := main(argv):
            return code
    _banner(len(steps) + 1, total, "call the function's handler as CVAT does (held-out frame)")
    frame = _held_out_frame(data / "synth_cvat11.zip")
    _call_handler(function, frame)
    frames = out / "frames"
    frames.mkdir()
    shutil.copy(frame, frames / frame.name)
    later = [
        ("predict on a folder of images", ["predict", str(run_dir), "--images", str(frames),
         "--out", str(out / "predictions.json"), "--device", args.device]),
        ("export every annotated object as a crop", ["crop", str(data / "synth_cvat11.zip"),
         "--out", str(out / "crops"), "--padding", "4"]),
    ]
    for number, (title, argv) in enumerate(later, start=len(steps) + 2):
        _banner(number, total, title, argv)
        if code := main(argv):
            return code
    validation = json.loads((run_dir / METRICS_JSON).read_text())
    print(f"\nvalidation mAP50 {validation['mAP50']:.3f}, mAP@[.5:.95] {validation['mAP']:.3f}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is in {out}/")
    return 0


def _banner(number: int, total: int, title: str, argv: list[str] | None = None) -> None:
    command = f"\n    $ python -m trainer {' '.join(argv)}" if argv else ""
    print(f"\n[{number}/{total}] {title}{command}", flush=True)


def _held_out_frame(export: Path) -> Path:
    """A Validation image: the model never trained on it."""
    from trainer.data.readers import load_dataset

    data = load_dataset([export])
    return next(r.path for r in data.images if r.subset.lower() == "validation")


def _call_handler(function: Path, frame: Path) -> None:
    """Invoke main.handler through nuclio-sdk with the exact JSON body CVAT sends."""
    import nuclio_sdk
    import yaml
    from nuclio_sdk.test import Platform

    # The environment Nuclio gives the function (function.yaml's spec.env: the engine, the score
    # attribute), with the bundle where it lies here rather than at its path in the image.
    spec = yaml.safe_load((function / "function.yaml").read_text())["spec"]
    os.environ.update({e["name"]: str(e["value"]) for e in spec.get("env", [])})
    os.environ["CVAT_DETECTOR_BUNDLE"] = str(function / "bundle")
    os.environ.setdefault("CVAT_DETECTOR_DEVICE", "cpu")
    from serverless import main as function_main

    body = {"image": base64.b64encode(frame.read_bytes()).decode()}
    print(f'    POST {{"image": <base64 of {frame.name}, {frame.stat().st_size} bytes>}}', flush=True)
    event = nuclio_sdk.Event(body=body, content_type="application/json")
    response = Platform().call_handler(function_main.handler, event)  # runs init_context first
    shapes = json.loads(response.body)
    print(f"    HTTP {response.status_code}, {len(shapes)} shapes:")
    for shape in shapes:
        points = ", ".join(f"{p:.1f}" for p in shape["points"])
        print(f"      {shape['label']:<10} {shape['type']:<9} confidence {shape['confidence']}  [{points}]")
