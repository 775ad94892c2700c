"""The suite's trained run (conftest ``trained``: a mobilenet trained 10 epochs on generated
circles and squares) through every path a user scores or serves it by: ``evaluate``, the Nuclio
handler, ``predict`` and the runtime alone. Ground truth is read from the export's
annotations.xml here, and detections are matched to it by hand (IoU >= 0.5, same label)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TRAINED_LABELS
from tests.test_handler import call, started_platform
from trainer.commands import main

pytestmark = pytest.mark.slow  # every test here needs the 10-epoch run

ROOT = Path(__file__).resolve().parents[1]
Box = tuple[float, float, float, float]


def _truth(export: Path) -> dict[str, list[tuple[str, Box]]]:
    """{file name: [(label, xyxy box)]} of the annotated Validation images, straight from
    annotations.xml (an image without shapes is not yet annotated: neither trained nor scored)."""
    with zipfile.ZipFile(export) as archive:
        root = ET.fromstring(archive.read("annotations.xml"))
    truth = {}
    for image in root.iter("image"):
        boxes = [(b.get("label"), tuple(float(b.get(k)) for k in ("xtl", "ytl", "xbr", "ybr")))
                 for b in image.iter("box")]  # fmt: skip
        if image.get("subset") == "Validation" and boxes:
            truth[image.get("name")] = boxes
    return truth


@pytest.fixture(scope="module")
def frames(trained, tmp_path_factory) -> dict[str, Path]:
    """The validation frames as files: {file name: path}."""
    folder = tmp_path_factory.mktemp("validation")
    with zipfile.ZipFile(trained["export"]) as archive:
        for name in _truth(trained["export"]):
            (folder / name).write_bytes(archive.read(f"images/Validation/{name}"))
    return {p.name: p for p in sorted(folder.iterdir())}


def _iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _tally(found: dict[str, list[tuple[str, float, Box]]], truth: dict) -> dict[str, list[int]]:
    """{label: [true positives, detections, ground truth]}: each detection, best score first,
    takes the unmatched ground-truth box of its label it overlaps most, if IoU >= 0.5."""
    counts = {label: [0, 0, 0] for label in TRAINED_LABELS}
    for name, objects in truth.items():
        free = list(objects)
        for label, _, box in sorted(found.get(name, []), key=lambda d: -d[1]):
            counts[label][1] += 1
            best = max((o for o in free if o[0] == label), key=lambda o: _iou(o[1], box), default=None)
            if best is not None and _iou(best[1], box) >= 0.5:
                free.remove(best)
                counts[label][0] += 1
        for label, _ in objects:
            counts[label][2] += 1
    return counts


def _operating_point(run: Path) -> dict[str, list[int]]:
    """The calibration's precision and recall of each class at its threshold, as counts."""
    calibration = json.loads((run / "model.json").read_text())["metrics"]["calibration"]
    counts = {}
    for label in TRAINED_LABELS:
        curve = calibration["per_class"][label]
        gt = curve["gt"]
        tp = round(curve["recall"] * gt)
        counts[label] = [tp, round(tp / curve["precision"]) if tp else 0, gt]
    return counts


def test_training_learns_the_generated_objects(trained):
    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    assert metrics["mAP50"] >= 0.3, metrics["summary"]


def test_run_holds_the_bundle_reports_and_plots(trained):
    run = trained["run"]
    info = json.loads((run / "model.json").read_text())
    assert info["labels"] == list(TRAINED_LABELS)
    assert info["architecture"] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert 0.0 < info["threshold"] < 1.0
    assert set(info["class_thresholds"]) == set(TRAINED_LABELS)
    assert info["provenance"]["data"]["objects"] > 0 and info["provenance"]["epochs_run"] == 10
    sizing = info["provenance"]["sizing"]  # what train chose and why, with the object sizes it saw
    assert sizing["how"] == {"image_size": "given", "anchors": "fitted to the training boxes"}
    assert info["anchors"] == sizing["anchors"] and len(info["anchors"]["sizes"]) == 3
    assert set(sizing["objects"]) == set(TRAINED_LABELS) and info["min_size"] == 224
    for name in ("weights.pt", "labels.txt", "results.txt", "metrics.json", "history.csv",
                 "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    assert len(list((run / "plots").glob("*.png"))) >= 3
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 11


def test_evaluate_reproduces_the_recorded_scores(trained, tmp_path, capsys):
    """``evaluate`` (the bundle through the Detector) on the run's validation split gives what
    training recorded (its own network, in the training loop) for the best epoch."""
    argv = ["evaluate", str(trained["run"]), str(trained["export"]), "--json", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    recorded = json.loads((trained["run"] / "metrics.json").read_text())
    assert evaluated["images"] == recorded["images"] == len(_truth(trained["export"]))
    for key in ("mAP50", "mAP", "mAP75"):
        assert evaluated[key] == pytest.approx(recorded[key], abs=1e-6), key
    for label in TRAINED_LABELS:
        assert evaluated["per_class"][label]["AP50"] == pytest.approx(
            recorded["per_class"][label]["AP50"], abs=1e-6
        )
        assert evaluated["per_class"][label]["AP50"] >= 0.3, label  # both classes, by name
    assert evaluated["calibration"]["threshold"] == pytest.approx(recorded["calibration"]["threshold"])


def test_the_handler_finds_the_objects_at_the_calibrated_thresholds(trained, frames):
    """CVAT sends no threshold: the bundle's calibrated ones apply, and the objects of the
    validation frames are found as calibration measured them."""
    platform = started_platform(CVAT_DETECTOR_BUNDLE=str(trained["run"]))
    found = {}
    for name, path in frames.items():
        status, shapes = call(platform, {"image": base64.b64encode(path.read_bytes()).decode()})
        assert status == 200
        found[name] = [(s["label"], float(s["confidence"]), tuple(s["points"])) for s in shapes]
    counts = _tally(found, _truth(trained["export"]))
    assert counts == _operating_point(trained["run"])
    for label, (tp, detections, gt) in counts.items():  # 10 epochs found 11/25 circles, 10/27 squares
        assert tp >= gt / 4 and tp >= detections / 3, (label, counts)


def test_predict_finds_the_objects_at_the_calibrated_thresholds(trained, frames, tmp_path):
    out = tmp_path / "pred.json"
    folder = next(iter(frames.values())).parent
    assert main(["predict", str(trained["run"]), "--images", str(folder), "--out", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    coco = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    found: dict[str, list] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        found[files[a["image_id"]]].append((names[a["category_id"]], a["score"], (x, y, x + w, y + h)))
    counts = _tally(found, _truth(trained["export"]))
    assert counts == _operating_point(trained["run"])


def test_bundle_loads_in_the_runtime_without_trainer(trained, frames):
    """The serverless package alone (no trainer module) loads the run and finds its objects."""
    code = (
        "import json, sys\n"
        "from serverless.detector import Detector\n"
        "from serverless.imageio import read_image\n"
        f"d = Detector({str(trained['run'])!r}, 'cpu')\n"
        f"paths = {[str(p) for p in frames.values()]!r}\n"
        "found = {}\n"
        "for path in paths:\n"
        "    det = d.detect(read_image(path))\n"
        "    found[path.rsplit('/', 1)[1]] = [(l, float(s), [float(v) for v in b])\n"
        "                                    for l, s, b in zip(det.labels, det.scores, det.boxes)]\n"
        "assert not [m for m in sys.modules if m == 'trainer' or m.startswith('trainer.')]\n"
        "print(json.dumps({'labels': d.labels, 'found': found}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["labels"] == list(TRAINED_LABELS)
    found = {name: [(label, score, tuple(box)) for label, score, box in dets]
             for name, dets in result["found"].items()}  # fmt: skip
    assert _tally(found, _truth(trained["export"])) == _operating_point(trained["run"])
