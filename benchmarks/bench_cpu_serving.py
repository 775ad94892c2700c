"""CPU serving: the OpenVINO engine against PyTorch fp32, same frames, same weights, one run.

For each bundle, on a 1920x1080 JPEG, a 2448x2048 PNG (generated, image-like) and a 640x480 BCCD
frame (tests/data/bccd_subset), decoded by the function's own decoder:

- ms per frame of :class:`serverless.detector.Detector` on the CPU (PyTorch fp32) and of
  :class:`serverless.engine.EngineDetector` (the verified OpenVINO export, f32), each with the
  threads :func:`serverless.engine.cpu_threads` gives (torch.set_num_threads for PyTorch); they take
  turns frame by frame (the order rotating each round), so the load of a shared machine hits both
  alike; medians of --rounds after one warm-up call each (the engine compiles a frame size then);
- the speed-up: the median over rounds of PyTorch's time / the engine's (goal >= 2);
- agreement with PyTorch (trainer.deploy.export.compare: boxes within 1 px or IoU >= 0.99, scores
  within 1e-3, nothing missing or extra) at the bundle's thresholds and at 0.05 (everything kept);
- on a CPU with AMX, the same for OpenVINO bf16x3 (serverless/bf16x3.py: f32-grade results from
  bf16 products, what ``package`` chooses there when its check finds it faithful and faster);
- with --bf16, the same for OpenVINO bf16 (an opt-in: faster on AMX CPUs, not exact), its agreement
  by the looser tolerance that ``package --engine-precision bf16`` checks (export.BF16).

Bundles: --run DIR (a trained run; --serve-size MIN,MAX serves a copy at another resize, e.g. a demo
model trained at 256 px at the default 800,1333), else untrained bundles of --arch at their default
size. Untrained detectors are chaotic (a 1/255 change of the input moves many detections), so use a
trained run for agreement figures; timings do not depend on training. /proc/pressure/cpu is printed
with each frame: other processes on the machine slow PyTorch more than OpenVINO.

    python benchmarks/bench_cpu_serving.py [--run runs/demo --serve-size 800,1333] [--arch NAME] [--bf16]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serverless.bf16x3 import cpu_has_amx
from serverless.bundle import MODEL_JSON, BundleInfo, save_bundle
from serverless.detector import Detector
from serverless.engine import EngineDetector, cpu_threads
from serverless.imageio import decode_image
from trainer.deploy.export import (
    BF16,
    SAME,
    Agreement,
    EngineUnfaithful,
    Tolerance,
    as_outputs,
    compare,
    export_engine,
    generated_frames,
)

ARCHS = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")
BCCD = Path(__file__).resolve().parents[1] / "tests" / "data" / "bccd_subset" / "cvat_for_images_1.1.zip"
BCCD_FRAME = "images/Train/BloodImage_00001.jpg"


def frames() -> dict[str, np.ndarray]:
    """The three benchmark frames, each encoded and decoded as CVAT sends and the function reads it."""
    (_, big), (_, huge) = generated_frames(((1920, 1080), (2448, 2048)), seed=3)
    encoded = {}
    for name, pixels, fmt in (("1920x1080 JPEG", big, "JPEG"), ("2448x2048 PNG", huge, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, quality=90)
        encoded[name] = buf.getvalue()
    with zipfile.ZipFile(BCCD) as z:
        encoded["640x480 BCCD JPEG"] = z.read(BCCD_FRAME)
    return {name: decode_image(data, name) for name, data in encoded.items()}


def bundles(args: argparse.Namespace, tmp: Path) -> list[Path]:
    """The bundles to compare: the runs given (resized copies with --serve-size), else untrained."""
    found = []
    for run in args.run:
        run = Path(run)
        if args.serve_size:
            copy = tmp / f"{run.name}-{args.serve_size[0]}"
            copy.mkdir()
            for file in ("model.json", "weights.pt", "labels.txt"):
                shutil.copy2(run / file, copy / file)
            info = json.loads((copy / MODEL_JSON).read_text())
            info["min_size"], info["max_size"] = args.serve_size
            (copy / MODEL_JSON).write_text(json.dumps(info))
            run = copy
        found.append(run)
    for arch in args.arch:
        torch.manual_seed(0)
        info = BundleInfo(architecture=arch, labels=["RBC", "WBC", "Platelets"])
        save_bundle(tmp / arch, info, info.build().state_dict())
        found.append(tmp / arch)
    return found


def bench_bundle(bundle: Path, shots: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    threads = cpu_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        engine_info = export_engine(bundle, generated_frames(), threads=threads)
    except EngineUnfaithful as exc:
        print(f"\n== {bundle}: no engine, PyTorch would serve it: {exc}")
        return
    exported = time.perf_counter() - start
    pytorch = Detector(bundle, "cpu")
    engines = {"openvino f32": EngineDetector(bundle, "f32", threads)}
    if cpu_has_amx():
        engines["openvino bf16x3"] = EngineDetector(bundle, "bf16x3", threads)
    if args.bf16:
        engines["openvino bf16"] = EngineDetector(bundle, "bf16", threads)
    verified = Agreement(**engine_info.verification["agreement"])
    resize = f"{engine_info.min_size}/{engine_info.max_size}"
    print(f"\n== {pytorch.info.architecture} ({bundle}), resize {resize}, {threads} threads; "
          f"export and verification {exported:.0f} s: {verified.summary()}")  # fmt: skip
    runners = {"pytorch fp32": pytorch, **engines}
    for name, frame in shots.items():
        pressure = _pressure()
        print(f"  {name:18s} {_speeds(_timings(runners, frame, args.rounds))}   cpu pressure {pressure} -> "
              f"{_pressure()}", flush=True)  # fmt: skip
        for k, engine in engines.items():
            tolerance = BF16 if engine.precision == "bf16" else SAME
            agreements = [f"@{label} {_agreement(pytorch, engine, frame, t, tolerance).summary()}"
                          for label, t in (("bundle thresholds", None), ("0.05", 0.05))]  # fmt: skip
            print(f"    {k} agreement (computed in {engine.precision}): " + "; ".join(agreements))


def _speeds(times: dict[str, list[float]]) -> str:
    """Median ms after the first call, and the median per-round speed-up over PyTorch."""
    reference = np.array(times["pytorch fp32"][1:])
    parts = []
    for k, ms in times.items():
        ratio = statistics.median(reference / np.array(ms[1:]))
        speedup = "" if k.startswith("pytorch") else f" (x{ratio:.2f})"
        parts.append(f"{k} {statistics.median(ms[1:]):6.0f} ms{speedup}")
    first = {k: round(v[0]) for k, v in times.items()}
    return " | ".join(parts) + f"   first calls {json.dumps(first)}"


def _timings(runners: dict[str, Detector | EngineDetector], frame: np.ndarray, rounds: int
             ) -> dict[str, list[float]]:
    """ms per detect call of each runner: a first call each, then ``rounds`` turns in rotating order."""
    times: dict[str, list[float]] = {k: [_ms(runner, frame)] for k, runner in runners.items()}
    order = list(runners)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            times[k].append(_ms(runners[k], frame))
    return times


def _agreement(pytorch: Detector, engine: EngineDetector, frame: np.ndarray, threshold: float | None,
               tolerance: Tolerance) -> Agreement:
    labels = pytorch.labels
    ref = as_outputs(pytorch.detect(frame, threshold), labels)
    got = as_outputs(engine.detect(frame, threshold), labels)
    return compare(ref, got, pytorch.thresholds(threshold), tolerance)


def _ms(runner: Detector | EngineDetector, frame: np.ndarray) -> float:
    start = time.perf_counter()
    runner.detect(frame)
    return (time.perf_counter() - start) * 1000


def _pressure() -> str:
    """Share of the last 10 s in which some runnable task waited for a CPU (PSI)."""
    try:
        return Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], metavar="DIR", help="trained run (repeatable)")
    parser.add_argument("--serve-size", type=lambda t: tuple(int(v) for v in t.split(",")),
                        metavar="MIN,MAX", help="serve copies of the runs at this resize")
    parser.add_argument("--arch", action="append", metavar="NAME",
                        help=f"untrained bundle of this architecture (without --run: {', '.join(ARCHS)})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also OpenVINO bf16 (opt-in precision)")
    args = parser.parse_args()  # fmt: skip
    if args.arch is None:
        args.arch = [] if args.run else list(ARCHS)
    shots = frames()
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"torch {torch.__version__}, {cpu_threads()} threads (cgroup quota / affinity), "
          f"started {time.strftime('%Y-%m-%d %H:%M')}, load average {load}")
    with tempfile.TemporaryDirectory() as tmp:
        for bundle in bundles(args, Path(tmp)):
            bench_bundle(bundle, shots, args)


if __name__ == "__main__":
    main()
