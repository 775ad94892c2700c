"""Nuclio handler: end-to-end cost against the bare model, and against a CVAT-style function.

For a 1920x1080 JPEG and a 2448x2048 PNG frame, on the CPU and (when present) the GPU:

- handler: the JSON request body CVAT sends → base64 → decode → detect → CVAT shapes → JSON
  response, called as Nuclio calls it (nuclio-sdk's Context and Event);
- forward: the bare network's forward pass on that decoded frame, timed inside the same handler
  call, so that the load of a shared machine cannot skew the comparison;
  overhead = (handler - forward) / handler, goal < 10 % on the CPU;
- CVAT-style: written the way CVAT's own PyTorch functions are (PIL → float tensor on the CPU →
  device → fp32 model, same weights, shapes filtered in Python); goal: handler >= 2x faster on GPU;
- init_context: bundle load + warm-up, which Nuclio's readiness limit (120 s) must cover.

Untrained fasterrcnn_resnet50_fpn_v2 (the default architecture) with threshold 0, so every frame
returns the full detections_per_img boxes: timings do not depend on training, and the shape
encoding is measured at its worst. Medians of --repeats runs after one warm-up run each, the
handler and the CVAT-style function taking turns.

    python benchmarks/bench_handler.py [--repeats 3] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nuclio_sdk
import numpy as np
import torch
from nuclio_sdk.test import Platform
from PIL import Image
from torchvision.transforms.functional import to_tensor

from serverless import main as function
from serverless.architectures import DEFAULT_ARCH
from serverless.bundle import BundleInfo, load_model, save_bundle

LABELS = ["RBC", "WBC", "Platelets"]
FRAMES = {"1920x1080 JPEG": ((1080, 1920), "JPEG"), "2448x2048 PNG": ((2048, 2448), "PNG")}


def make_frame(hw: tuple[int, int], fmt: str) -> bytes:
    """A camera-like frame: gradients, blobs and sensor noise (so it compresses realistically)."""
    h, w = hw
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:h, :w].astype(np.float32)
    image = np.stack([x / w * 200, y / h * 200, (x + y) / (w + h) * 120 + 60], axis=-1)
    for cx, cy, r in rng.uniform((0, 0, 10), (w, h, 60), (60, 3)):
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    buf = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, fmt, quality=90)
    return buf.getvalue()


class TimedForward(torch.nn.Module):
    """Wraps the detector's network to time its forward passes from inside the handler."""

    def __init__(self, model: torch.nn.Module, gpu: bool) -> None:
        super().__init__()
        self.model, self.gpu, self.seconds = model, gpu, 0.0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self._sync()
        start = time.perf_counter()
        outputs = self.model(images)
        self._sync()
        self.seconds += time.perf_counter() - start
        return outputs

    def _sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], gpu: bool) -> float:
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def cvat_style(model: torch.nn.Module, device: torch.device, body: dict) -> str:
    """A detector as CVAT's PyTorch functions write it (e.g. detectron2/retinanet_r101 main.py)."""
    image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
    threshold = float(body.get("threshold", 0.5))
    with torch.no_grad():
        output = model([to_tensor(image).to(device)])[0]
    results = []
    for box, score, label in zip(output["boxes"], output["scores"], output["labels"], strict=True):
        if score >= threshold:
            results.append({
                "confidence": str(float(score)),
                "label": LABELS[int(label) - 1],
                "points": box.tolist(),
                "type": "rectangle",
            })  # fmt: skip
    return json.dumps(results)


def start_function(bundle: Path, device: torch.device) -> tuple[nuclio_sdk.Context, float]:
    """The function's context after ``init_context`` (as Nuclio starts a worker), and its seconds."""
    os.environ.update(CVAT_DETECTOR_BUNDLE=str(bundle), CVAT_DETECTOR_DEVICE=str(device))
    platform = Platform()
    context = nuclio_sdk.Context(platform.context.logger, platform)
    start = time.perf_counter()
    function.init_context(context)
    return context, time.perf_counter() - start


def measure_frame(
    context: nuclio_sdk.Context, reference: torch.nn.Module, device: torch.device, data: bytes, repeats: int
) -> dict[str, float]:
    """Medians of ``repeats`` runs after one warm-up: the handler end to end, the bare forward inside
    it, and the CVAT-style function, taking turns. ``context``'s detector model must be TimedForward."""
    gpu = device.type == "cuda"
    timed = context.user_data.detector.model
    body = {"image": base64.b64encode(data).decode("ascii"), "threshold": 0.0}
    event = nuclio_sdk.Event(body=body, content_type="application/json")
    shapes = json.loads(function.handler(context, event).body)  # warm-up
    cvat_style(reference, device, body)
    handler, forward, cvat = [], [], []
    for _ in range(repeats):
        timed.seconds = 0.0
        handler.append(timed_ms(lambda event=event: function.handler(context, event), gpu))
        forward.append(timed.seconds * 1000)
        cvat.append(timed_ms(lambda body=body: cvat_style(reference, device, body), gpu))
    return {
        "shapes": len(shapes),
        "handler_ms": statistics.median(handler),
        "forward_ms": statistics.median(forward),
        "overhead": statistics.median((h - f) / h for h, f in zip(handler, forward, strict=True)),
        "cvat_ms": statistics.median(cvat),
    }


def bench_device(bundle: Path, device: torch.device, repeats: int) -> None:
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
    print(f"\n== {device.type}: {name}")
    context, seconds = start_function(bundle, device)
    print(f"init_context (load + warm-up): {seconds:.1f} s (readiness limit 120 s)")
    detector = context.user_data.detector
    detector.model = TimedForward(detector.model, gpu)
    reference = load_model(bundle, device)[1]  # its own fp32 copy of the same weights
    for label, (hw, fmt) in FRAMES.items():
        data = make_frame(hw, fmt)
        m = measure_frame(context, reference, device, data, repeats)
        print(
            f"{label} ({len(data) / 1e6:.1f} MB, {m['shapes']} shapes): "
            f"handler {m['handler_ms']:.0f} ms, bare forward {m['forward_ms']:.0f} ms "
            f"-> overhead {m['overhead']:.1%}{'' if gpu else ' (goal < 10%)'}; "
            f"CVAT-style {m['cvat_ms']:.0f} ms -> handler is {m['cvat_ms'] / m['handler_ms']:.2f}x faster"
            f"{' (goal >= 2x)' if gpu else ''}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.manual_seed(0)
    info = BundleInfo(architecture=DEFAULT_ARCH, labels=LABELS, threshold=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(tmp, info, info.build().state_dict())
        print(f"{DEFAULT_ARCH} (untrained), {len(LABELS)} labels, torch {torch.__version__}")
        for name in args.devices:
            if name == "cuda" and not torch.cuda.is_available():
                print("\n== cuda: no GPU visible, skipped")
                continue
            bench_device(Path(tmp), torch.device(name), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
