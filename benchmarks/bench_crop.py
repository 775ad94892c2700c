"""Crop exporter throughput and memory against a MISO-style baseline, in the same run.

The baseline crops the way MISO's ``crop-objects`` does: for every object open and decode its
image again, crop with PIL, save a PNG, one object after the other. The exporter decodes each image
once, cuts all its objects from that array and spreads images over worker threads.

Both run in their own subprocess on the same generated "CVAT for images 1.1" export (800x600 JPEG
frames, 25 boxes each); only the cropping is timed (reading the export is the same for both).
Peak RSS is the subprocess's largest resident set while cropping, sampled every 20 ms (it includes
the libraries every command imports and the export as read); "while cropping" is that peak minus
the size once the export was read. The exporter is measured at two dataset sizes to show that its
memory does not grow with the export. CPU ms per object (user + system time, all threads) is
printed too: unlike objects/s it stays comparable when other jobs share the machine.

    .venv/bin/python benchmarks/bench_crop.py [--objects 20000] [--small 5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, PER_IMAGE = 800, 600, 25
LABELS = ("diatom", "radiolarian", "foram", "debris")


def make_export(folder: Path, objects: int, seed: int = 0) -> Path:
    """A CVAT for images 1.1 export folder with ``objects`` boxes on 800x600 JPEG frames."""
    rng = np.random.default_rng(seed)
    (folder / "images" / "Train").mkdir(parents=True)
    labels = "".join(f"<label><name>{n}</name></label>" for n in LABELS)
    lines = [f"<annotations><version>1.1</version><meta><project><labels>{labels}</labels>"
             "</project></meta>"]  # fmt: skip
    for i in range(math.ceil(objects / PER_IMAGE)):
        name = f"slide_{i:05d}.jpg"
        coarse = rng.integers(60, 200, (HEIGHT // 32, WIDTH // 32, 3), dtype=np.uint8)
        frame = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC))
        noise = rng.integers(-12, 13, frame.shape, dtype=np.int16)
        pixels = np.clip(frame + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / "Train" / name, quality=90)
        lines.append(f'<image id="{i}" name="{name}" subset="Train" task_id="1" '
                     f'width="{WIDTH}" height="{HEIGHT}">')  # fmt: skip
        for _ in range(min(PER_IMAGE, objects - i * PER_IMAGE)):
            w, h = rng.uniform(24, 128, 2)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            label = quoteattr(LABELS[int(rng.integers(len(LABELS)))])
            lines.append(f'<box label={label} occluded="0" xtl="{x:.2f}" ytl="{y:.2f}" '
                         f'xbr="{x + w:.2f}" ybr="{y + h:.2f}" z_order="0"/>')  # fmt: skip
        lines.append("</image>")
    lines.append("</annotations>")
    (folder / "annotations.xml").write_text("\n".join(lines))
    return folder


def run_ours(data, out: Path, workers: int) -> int:
    from trainer.crop.exporter import CropOptions, crop_annotations

    return crop_annotations(data, out, CropOptions(workers=workers, progress=False)).total


def run_baseline(data, out: Path, workers: int) -> int:
    """MISO-style: per object, open and decode the image again, crop, save; no parallelism."""
    count = 0
    for image in data.images:
        for index, shape in enumerate(image.shapes):
            x1, y1, x2, y2 = shape.box
            folder = out / shape.label / image.subset
            folder.mkdir(parents=True, exist_ok=True)
            box = (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))
            with Image.open(image.path) as img:  # crop() decodes the whole frame
                img.crop(box).save(folder / f"{Path(image.name).stem}__{index}.png")
            count += 1
    return count


def child(kind: str, export: str, out: str, workers: int) -> None:
    """Subprocess body: read the export (untimed), crop it (timed, memory sampled), print JSON."""
    from trainer.data.readers import load_dataset

    data = load_dataset([export])
    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu, start = cpu_seconds(), time.perf_counter()
    count = {"ours": run_ours, "baseline": run_baseline}[kind](data, Path(out), workers)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    done.set()
    sampler.join()
    result = {"objects": count, "seconds": seconds, "cpu": cpu, "before": before}
    print(json.dumps(result | {"peak": max(peak[0], rss())}))


def rss() -> int:
    """Resident bytes of this process (Linux /proc); workers are threads, so this is all of it."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")


def cpu_seconds() -> float:
    """User + system time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(kind: str, export: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "_child", kind, str(export), str(out), str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode})")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    return r | {
        "rate": r["objects"] / r["seconds"],
        "peak_mib": r["peak"] / mib,
        "growth_mib": (r["peak"] - r["before"]) / mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=5_000, help="second size for the memory check")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_crop_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        big = make_export(tmp / "big", args.objects)
        small = make_export(tmp / "small", args.small, seed=1)
        took = time.perf_counter() - t0
        print(f"generated exports of {args.objects} and {args.small} objects "
              f"({WIDTH}x{HEIGHT} JPEG, {PER_IMAGE} per image) in {took:.0f} s")  # fmt: skip
        ours_small = measure("ours", small, tmp / "ours_small", args.workers)
        ours = measure("ours", big, tmp / "ours", args.workers)
        base = measure("baseline", big, tmp / "base", 1)
    print(f"{'run':<36}{'objects':>8}{'seconds':>9}{'objects/s':>11}{'CPU ms/obj':>12}"
          f"{'peak RSS':>11}{'while cropping':>16}")  # fmt: skip
    for name, r in (
        ("baseline (MISO-style, 1 process)", base),
        (f"exporter, {args.workers} workers", ours),
        (f"exporter, {args.workers} workers, small export", ours_small),
    ):
        print(f"{name:<36}{r['objects']:>8}{r['seconds']:>9.1f}{r['rate']:>11.0f}"
              f"{1000 * r['cpu'] / r['objects']:>12.2f}"
              f"{r['peak_mib']:>7.0f} MiB{r['growth_mib']:>+12.0f} MiB")  # fmt: skip
    print(f"speed-up: {ours['rate'] / base['rate']:.1f}x the baseline's objects/s on "
          f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); "
          f"{base['cpu'] / ours['cpu']:.1f}x less CPU time per object")  # fmt: skip
    print(f"exporter peak RSS while cropping: {ours_small['peak_mib']:.0f} MiB at {args.small} "
          f"objects, {ours['peak_mib']:.0f} MiB at {args.objects} objects (cropping adds "
          f"{ours_small['growth_mib']:+.0f} / {ours['growth_mib']:+.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
