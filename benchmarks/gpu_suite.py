"""The GPU suite: what a machine with one GPU must show about this project, in one run of < 8 minutes.

    bash benchmarks/gpu_suite.sh                        # make bench-gpu (docs/benchmarks.md: how, where)
    bash benchmarks/gpu_suite.sh --quick --device cpu   # the same code, small, on a CPU (tested)

Prints the device, torch version and dtype path, then, each section with its own timing:

1. the Nuclio handler end to end (base64 frame in, JSON out) against a CVAT-style function (PIL →
   float tensor on the CPU → fp32 model, same weights) on 1920x1080 JPEG and 2448x2048 PNG frames:
   ms per frame and the ratio (goal >= 2x);
2. a whole task as CVAT runs it: 200 different 1920x1080 JPEG frames, one request after another
   through the handler: frames/s and the share of time outside the model's forward pass, with GPU
   JPEG decoding as the function chooses it and switched off;
3. training images/s of the trainer against the torchvision-references loop on the same data and
   model (goal >= 1.5x), with peak GPU memory;
4. BCCD accuracy from scratch under a fixed 4-minute budget: validation mAP50 of the default
   architecture and of the fastest two-stage one, both trained at the same time on the one GPU;
5. the dtype paths on this GPU (bf16, forced fp16, fp32) give the same detections: the BCCD-trained
   default model on the validation frames, detections matched by label and box IoU >= 0.9.

Sections 1-3 use untrained weights (timings do not depend on training; threshold 0 returns the full
300 detections per frame, the worst case for the response). The code is the benchmark scripts':
bench_handler (1, 2), bench_train (3), bench_accuracy_bccd (4).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import bench_accuracy_bccd  # noqa: E402
import bench_handler  # noqa: E402
import bench_train  # noqa: E402
import nuclio_sdk  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from serverless import main as function  # noqa: E402
from serverless.architectures import DEFAULT_ARCH  # noqa: E402
from serverless.bundle import BundleInfo, load_model, save_bundle  # noqa: E402
from serverless.detector import Detections, Detector  # noqa: E402
from serverless.errors import DeviceError  # noqa: E402
from serverless.gpu_jpeg import FrameDecoder  # noqa: E402
from serverless.imageio import read_image  # noqa: E402
from serverless.precision import choose_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"
#: Where the suite finds BCCD: carried with the tree (make gpu-data), or ../shared beside it.
BCCD_PATHS = [REPO / ".bccd" / "bccd_cvat11.zip", bench_accuracy_bccd.BCCD]
BCCD_SUBSET = REPO / "tests" / "data" / "bccd_subset" / "cvat_for_images_1.1.zip"
#: Share of detections each dtype path must find in the other's (same label, box IoU >= 0.9).
AGREEMENT_GOAL = 0.95


@dataclass(frozen=True)
class Plan:
    """How big each section is: the full GPU run, or the quick one that keeps the code tested."""

    arch: str
    size: tuple[int | None, int | None]  # the model's min_size, max_size (None: the architecture's)
    frames: dict[str, tuple[tuple[int, int], str]]
    repeats: int
    task: tuple[int, tuple[int, int]]  # frames, (height, width)
    train: dict[str, int | str]  # bench_train's options, and the generated images' (width, height)
    bccd: tuple[float, int, list[str]]  # minutes, image size, extra trainer flags
    archs: tuple[str, ...]  # trained on BCCD; the first one's bundle is compared in section 5
    compare: int  # validation frames compared in section 5


FULL = Plan(
    arch=DEFAULT_ARCH, size=(None, None), frames=bench_handler.FRAMES, repeats=5, task=(200, (1080, 1920)),
    train={"arch": DEFAULT_ARCH, "size": 800, "images": 32, "batch_size": 4, "workers": 4, "epochs": 2,
           "frame": (640, 480)},
    bccd=(4.0, 480, []), archs=(DEFAULT_ARCH, FAST_ARCH), compare=87,
)
QUICK = Plan(
    arch=FAST_ARCH, size=(64, 128), frames={"320x180 JPEG": ((180, 320), "JPEG"),
                                            "408x341 PNG": ((341, 408), "PNG")},
    repeats=1, task=(3, (180, 320)),
    train={"arch": FAST_ARCH, "size": 64, "images": 2, "batch_size": 2, "workers": 0, "epochs": 1,
           "frame": (128, 96)},
    bccd=(0.0, 64, ["--workers", "0"]), archs=(FAST_ARCH,), compare=2,
)  # fmt: skip


def header(device: torch.device, argv: list[str]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = (f"{props.name} (compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB)")
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    return (f"cvat-detector GPU suite, {when}: python benchmarks/gpu_suite.py {' '.join(argv)}\n"
            f"device: {name}\n{versions}\ndtype path: {choose_precision(device)}")


def section_handler(
    plan: Plan, bundle: Path, device: torch.device, measure: bool = True
) -> nuclio_sdk.Context:
    """1. handler vs CVAT-style function; returns the started function (section 2 uses it)."""
    context, seconds = bench_handler.start_function(bundle, device)
    logging.getLogger("mock_platform").setLevel(logging.INFO)  # nuclio_sdk's test logger: no per-frame lines
    detector = context.user_data.detector
    detector.model = bench_handler.TimedForward(detector.model, device.type == "cuda")
    reference = load_model(bundle, device)[1]
    print(f"init_context {seconds:.1f} s; {detector.info.architecture}, precision {detector.precision}; "
          f"GPU JPEG decoding: {sorted(context.user_data.decoder.differences.items()) or 'off (no GPU)'}")
    for label, (hw, fmt) in plan.frames.items() if measure else ():
        data = bench_handler.make_frame(hw, fmt)
        m = bench_handler.measure_frame(context, reference, device, data, plan.repeats)
        ratio = m["cvat_ms"] / m["handler_ms"]
        print(f"{label}: handler {m['handler_ms']:.1f} ms/frame (forward {m['forward_ms']:.1f} ms, "
              f"{m['shapes']} shapes), CVAT-style {m['cvat_ms']:.1f} ms/frame -> {ratio:.2f}x "
              f"(goal >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    return context


def task_frames(plan: Plan) -> list[bytes]:
    """Different JPEG frames of one scene, as a video task's frames differ."""
    count, hw = plan.task
    with Image.open(io.BytesIO(bench_handler.make_frame(hw, "JPEG"))) as img:
        scene = np.asarray(img.convert("RGB"))
    frames = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(np.roll(scene, 7 * i, axis=1)).save(buf, "JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def section_task(plan: Plan, context: nuclio_sdk.Context, device: torch.device) -> None:
    """2. a whole task, frame after frame, with the decoder the function chose and with PIL only."""
    events = [nuclio_sdk.Event(body={"image": base64.b64encode(f).decode("ascii")},
                               content_type="application/json") for f in task_frames(plan)]
    timed = context.user_data.detector.model
    chosen = context.user_data.decoder
    for name, decoder in (("as chosen", chosen), ("PIL only", FrameDecoder(device, enabled=False))):
        context.user_data.decoder = decoder
        timed.seconds = 0.0
        start = time.perf_counter()
        for event in events:
            response = function.handler(context, event)
            assert response.status_code == 200, response.body
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        print(f"{len(events)} frames {plan.task[1][1]}x{plan.task[1][0]} JPEG, decoding {name} "
              f"({'GPU' if decoder.on_gpu else 'PIL'}): {len(events) / total:.2f} frames/s, "
              f"{1 - timed.seconds / total:.1%} of the time outside the model forward")
    context.user_data.decoder = chosen


def section_training(plan: Plan, device: torch.device) -> None:
    """3. trainer vs references loop, images/s and peak GPU memory."""
    args = argparse.Namespace(**plan.train)
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_train.make_data(Path(tmp), args.images, args.frame)
        rates, peaks = {}, {}
        for name, run in (("references loop (fp32)", bench_train.run_reference),
                          (f"trainer ({choose_precision(device).name})", bench_train.run_trainer)):
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            rates[name] = run(args, data, device)
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
    print(f"{args.arch} at {args.size} px, batch {args.batch_size}, {args.images} images "
          f"{args.frame[0]}x{args.frame[1]}, "
          f"{args.workers} workers")
    for name, rate in rates.items():
        print(f"{name}: {rate:.2f} images/s, peak GPU memory {peaks[name]:.1f} GiB")
    reference, trainer = rates.values()
    ratio = trainer / reference
    print(f"trainer / references: {ratio:.2f}x (goal >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")


def section_bccd(plan: Plan, data: Path, device: torch.device, out: Path) -> dict[str, dict]:
    """4. BCCD from scratch under the budget, the architectures trained at the same time."""
    minutes, size, extra = plan.bccd
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(arch: str) -> None:
        argv = [str(data), "--arch", arch, "--weights", "none", "--device", str(device), "--patience", "0",
                "--image-size", str(size), *extra]
        try:
            epochs = bench_accuracy_bccd.train_for(minutes, argv, out / arch, tag=f"[{arch}] ")
            results[arch] = {**bench_accuracy_bccd.result(out / arch), "epochs": epochs}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arch,)) for arch in plan.archs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for arch, found in results.items():
        print(f"BCCD {data.name}, {arch}, from scratch, {minutes:g} min budget ({found['epochs']} epochs, "
              f"{found['precision']}): validation mAP50 {found['mAP50']:.3f}, mAP {found['mAP']:.3f}")
    return results


def agreement(a: Detections, b: Detections, iou: float = 0.9) -> tuple[int, int, float]:
    """Detections of ``a`` that ``b`` has too (same label, box IoU >= iou), of ``len(a)``, and the
    largest score difference between matched ones."""
    if not len(a) or not len(b):
        return 0, len(a), 0.0
    ious = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).numpy()
    ious[np.array(a.labels)[:, None] != np.array(b.labels)[None]] = 0
    best = ious.argmax(1)
    matched = ious[np.arange(len(a)), best] >= iou
    diff = np.abs(a.scores - b.scores[best])[matched]
    return int(matched.sum()), len(a), float(diff.max()) if len(diff) else 0.0


def validation_frames(data: Path, count: int) -> list[np.ndarray]:
    from trainer.data.readers import load_dataset

    records = [r for r in load_dataset([data]).images if r.subset.lower().startswith("val")]
    return [read_image(r.path) for r in records[:count]]


def section_dtypes(bundle: Path, frames: list[np.ndarray], device: torch.device) -> None:
    """5. the same detections from every dtype path this device has (the CPU: fp32 only)."""
    found: dict[str, list[Detections]] = {}
    for mode in ("bf16", "fp16", "off") if device.type == "cuda" else ("auto", "off"):
        try:
            detector = Detector(bundle, str(device), mode)
        except DeviceError as exc:
            print(f"{mode}: not run ({exc})")
            continue
        found[f"{detector.precision.name} ({mode})"] = [detector.detect(frame) for frame in frames]
    names = list(found)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ab = [agreement(x, y) for x, y in zip(found[a], found[b], strict=True)]
            ba = [agreement(y, x) for x, y in zip(found[a], found[b], strict=True)]
            shares = [sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1) for rows in (ab, ba)]
            print(f"{a} vs {b} on {len(frames)} validation frames: {shares[0]:.1%} of "
                  f"{sum(r[1] for r in ab)} and {shares[1]:.1%} of {sum(r[1] for r in ba)} detections "
                  f"matched (same label, IoU >= 0.9), largest score difference "
                  f"{max((r[2] for r in ab), default=0):.3f} "
                  f"(goal >= {AGREEMENT_GOAL:.0%}: {'met' if min(shares) >= AGREEMENT_GOAL else 'NOT met'})")


class Sections:
    """Prints each section's title and how long it took."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, title: str):
        print(f"\n== {title}", flush=True)
        return _Timed()

    def total(self) -> str:
        return f"\nsuite finished in {(time.perf_counter() - self.start) / 60:.1f} min (budget 8 min)"


class _Timed:
    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        print(f"(section: {time.perf_counter() - self.start:.0f} s)", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: keeps the code tested on a CPU")
    p.add_argument("--bccd", type=Path, help="BCCD 'CVAT for images 1.1' zip (default: .bccd/, else "
                   "../shared/datasets/bccd; --quick: the 12-image subset in tests/data)")
    p.add_argument("--sections", default="12345", help="which sections to run (default: all, 12345)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; --quick --device cpu tests the suite", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if args.quick:  # one thread each: the quick run tests code, and a busy CPU slows spinning threads
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the training subprocesses'
    data = args.bccd or (BCCD_SUBSET if args.quick else next((p for p in BCCD_PATHS if p.exists()), None))
    if data is None or not data.exists():
        print(f"error: BCCD not found in {' or '.join(map(str, BCCD_PATHS))}; `make gpu-data` copies it "
              "to .bccd/ (carry it to the GPU machine), or pass --bccd", file=sys.stderr)
        return 2
    print(header(device, argv), flush=True)
    section = Sections()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        info = BundleInfo(architecture=plan.arch, labels=bench_handler.LABELS, threshold=0.0,
                          min_size=plan.size[0], max_size=plan.size[1])
        save_bundle(tmp / "untrained", info, info.build().state_dict())
        context = None
        if "1" in args.sections or "2" in args.sections:
            with section("1. handler end to end vs a CVAT-style function"):
                context = section_handler(plan, tmp / "untrained", device, measure="1" in args.sections)
        if "2" in args.sections:
            with section("2. a whole task, one request after another"):
                section_task(plan, context, device)
        if "3" in args.sections:
            with section("3. training throughput"):
                section_training(plan, device)
        if "4" in args.sections or "5" in args.sections:
            with section("4. BCCD accuracy from scratch under a fixed budget"):
                section_bccd(plan, data, device, tmp / "bccd")
        if "5" in args.sections:
            with section("5. dtype paths give the same detections"):
                section_dtypes(tmp / "bccd" / plan.archs[0], validation_frames(data, plan.compare), device)
    print(section.total())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
