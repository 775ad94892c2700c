"""Reading a large CVAT export: trainer.data.readers.load_dataset vs datumaro's CVAT importer.

The export: an unpacked "CVAT for images 1.1" project export with 100 000 boxes (2 000 images x
50 boxes, CVAT's exact XML layout) and a small 1920x1080 JPEG per image at images/<name>.
Every box is materialised in each library's in-memory dataset. Three measurements:
  datumaro     Dataset.import_from(folder, "cvat") + items iterated; checks each image exists
  ours parse   load_dataset on the same annotations.xml without the images folder: the parse,
               like for like with datumaro (which never opens an image)
  ours full    load_dataset on the folder with images: also opens each image header to check
               its real (EXIF-aware) size against the annotation, work datumaro does not do
datumaro runs from .venv-bench (a separate venv), ours from this project's venv. Each run is a
fresh process; runs alternate between the three so they meet the same machine load, and the best
of the runs counts (CPU time is shown too: it is steadier on a busy machine). The timed region is
the load call plus a full gc.collect(), so collector work deferred by either side is counted;
imports are excluded. Peak RSS is os.wait4's rusage of that process, with the increase over the
process's RSS after its imports.

Set up the baseline once:  python3 -m venv .venv-bench && .venv-bench/bin/pip install datumaro
Run:                       .venv/bin/python benchmarks/bench_parse.py [--images 2000 --boxes 50]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
GOAL = 5.0
SIDES = ("ours parse", "ours full", "datumaro")


def write_export(folder: Path, images: int, boxes: int) -> int:
    """annotations.xml (meta from the synthetic generator) and images/<name>; the box count."""
    from PIL import Image

    from trainer.data.synth import generate

    sample = generate(folder.parent / "sample", train=1, val=1, empty=0, formats=["cvat"],
                      zipped=False)  # fmt: skip
    header = (sample["cvat"] / "annotations.xml").read_text().split("  <image ")[0]
    jpeg = io.BytesIO()
    Image.new("RGB", (1920, 1080), (120, 130, 110)).save(jpeg, "JPEG")
    (folder / "images").mkdir(parents=True)
    labels = ("circle", "square", "triangle")
    with open(folder / "annotations.xml", "w", encoding="utf-8") as fh:
        fh.write(header)
        for i in range(images):
            subset, task = ("Train", 1) if i % 5 else ("Validation", 2)
            (folder / "images" / f"frame_{i:06d}.jpg").write_bytes(jpeg.getvalue())
            fh.write(f'  <image id="{i}" name="frame_{i:06d}.jpg" subset="{subset}" '
                     f'task_id="{task}" width="1920" height="1080">\n')  # fmt: skip
            for j in range(boxes):
                x, y = (i * 37 + j * 91) % 1800, (i * 53 + j * 29) % 1000
                fh.write(f'    <box label="{labels[j % 3]}" source="manual" occluded="0" '
                         f'xtl="{x:.2f}" ytl="{y:.2f}" xbr="{x + 40.5:.2f}" ybr="{y + 60.25:.2f}" '
                         'z_order="0">\n    </box>\n')  # fmt: skip
            fh.write("  </image>\n")
        fh.write("</annotations>\n")
    return images * boxes


def child(side: str, folder: str) -> None:
    """Runs in a fresh process: import, then time the load alone; prints one JSON line."""
    if side.startswith("ours"):
        sys.path.insert(0, str(ROOT))
        from trainer.data.readers import load_dataset

        def load() -> tuple[int, int]:
            data = load_dataset([folder])
            return len(data.images), sum(len(im.shapes) for im in data.images)
    else:
        from datumaro.components.annotation import AnnotationType
        from datumaro.components.dataset import Dataset

        def load() -> tuple[int, int]:
            items = list(Dataset.import_from(folder, "cvat"))
            boxes = sum(a.type == AnnotationType.bbox for it in items for a in it.annotations)
            return len(items), boxes

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    images, boxes = load()
    gc.collect()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = {"seconds": seconds, "cpu_seconds": cpu, "images": images, "boxes": boxes}
    print(json.dumps(result | {"rss_before_kb": before}))


def run_child(side: str, folder: Path) -> dict:
    """One fresh process: its JSON result plus its own peak RSS (os.wait4's rusage)."""
    python = str(BENCH_PYTHON) if side == "datumaro" else sys.executable
    proc = subprocess.Popen(
        [python, __file__, "_child", side, str(folder)], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{side} run failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_rss_kb": usage.ru_maxrss}


def measure(folders: dict[str, Path], runs: int) -> dict[str, dict]:
    """Best wall and best CPU time of each side over ``runs`` alternating runs."""
    best: dict[str, dict] = {}
    for _ in range(runs):
        for side in SIDES:
            result = run_child(side, folders[side])
            kept = best.setdefault(side, result)
            if result["seconds"] < kept["seconds"]:
                best[side] = kept = result | {"cpu_seconds": kept["cpu_seconds"]}
            kept["cpu_seconds"] = min(kept["cpu_seconds"], result["cpu_seconds"])
    return best


def report(results: dict[str, dict], total: int) -> int:
    for side, r in results.items():
        peak, growth = r["peak_rss_kb"] / 1024, (r["peak_rss_kb"] - r["rss_before_kb"]) / 1024
        print(f"{side:>10}: {r['seconds']:5.2f} s wall {r['cpu_seconds']:5.2f} s CPU  "
              f"{r['boxes']} boxes in {r['images']} images  "
              f"peak RSS {peak:4.0f} MiB (+{growth:.0f} over imports)")  # fmt: skip
        if r["boxes"] != total:
            print(f"error: {side} read {r['boxes']} boxes, expected {total}")
            return 1
    base = results["datumaro"]
    for side in ("ours parse", "ours full"):
        wall = base["seconds"] / results[side]["seconds"]
        cpu = base["cpu_seconds"] / results[side]["cpu_seconds"]
        print(f"speed-up of {side} vs datumaro: {wall:.1f}x wall, {cpu:.1f}x CPU "
              f"(goal >= {GOAL:.0f}x)")  # fmt: skip
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--boxes", type=int, default=50, help="boxes per image")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (best is kept)")
    args = parser.parse_args()
    if not BENCH_PYTHON.exists():
        print(f"baseline missing: {BENCH_PYTHON} not found; set it up with\n"
              "  python3 -m venv .venv-bench && .venv-bench/bin/pip install datumaro")  # fmt: skip
        return 1
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        full, parse_only = Path(tmp) / "export", Path(tmp) / "annotations-only"
        total = write_export(full, args.images, args.boxes)
        parse_only.mkdir()
        os.link(full / "annotations.xml", parse_only / "annotations.xml")
        size_mb = (full / "annotations.xml").stat().st_size / 2**20
        print(f"export: {args.images} images, {total} boxes, annotations.xml {size_mb:.1f} MiB")
        folders = {"ours parse": parse_only, "ours full": full, "datumaro": full}
        return report(measure(folders, args.runs), total)


if __name__ == "__main__":
    sys.exit(main())
