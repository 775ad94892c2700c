"""`count`: tables a scientist can publish, checked against counts known by construction.

Model counts are checked on generated images whose true objects are known, with a stand-in
detector of known miss and false-alarm rates: it reports each true object with probability
:data:`RECALL` and adds a false box with probability :data:`FALSE_ALARM` per image, decided by a
seeded generator per image, so both the validation run and the counting run see the same model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serverless import detector as detector_module
from serverless.bundle import BundleInfo
from serverless.detector import Detections, Detector
from serverless.imageio import read_image
from tests.conftest import module_dir
from tests.factories import make_bundle
from trainer.commands import main
from trainer.data.readers import load_dataset
from trainer.data.synth import generate
from trainer.evaluation.counts import MIN_GT, Evidence, correct, evidence_from_bundle

LABELS = ["circle", "square", "triangle"]
RECALL = 0.6
FALSE_ALARM = 0.3
SAMPLES = 6


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_annotation_counts_keep_zeros_and_not_validated_apart(cvat_export, tmp_path, capsys):
    box = '<box label="{}" occluded="0" source="manual" xtl="1" ytl="1" xbr="9" ybr="9" z_order="0"/>'
    images = (
        '<image id="0" name="a.png" subset="Train" task_id="15" width="40" height="30">'
        + box.format("cell") * 2 + box.format("cell_NV") + "</image>"
        '<image id="1" name="b.png" subset="Train" task_id="15" width="40" height="30">'
        + box.format("debris") + "</image>"
        '<image id="0" name="c.png" subset="Train" task_id="16" width="40" height="30">'
        + box.format("cell_NV") * 3 + "</image>"
    )  # fmt: skip
    export = cvat_export(images, labels=("cell", "cell_NV", "debris"))
    out = tmp_path / "counts"
    assert main(["count", str(export), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["label"], r["validated"], r["not_validated"], r["total"]) for r in report["per_label"]] == [
        ("cell", 2, 4, 6), ("debris", 1, 0, 1)
    ]  # fmt: skip
    per_image = {(r["image"], r["label"]): (r["validated"], r["not_validated"])
                 for r in rows(out / "per_image.csv")}  # fmt: skip
    assert per_image == {
        ("Train/a.png", "cell"): ("2", "1"), ("Train/a.png", "debris"): ("0", "0"),
        ("Train/b.png", "cell"): ("0", "0"), ("Train/b.png", "debris"): ("1", "0"),
        ("Train/c.png", "cell"): ("0", "3"), ("Train/c.png", "debris"): ("0", "0"),
    }  # fmt: skip
    per_sample = {(r["sample"], r["label"]): (r["images"], r["total"]) for r in rows(out / "per_sample.csv")}
    assert per_sample[("task 15", "cell")] == ("2", "3") and per_sample[("task 16", "cell")] == ("1", "3")
    assert (out / "counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "corrected" not in rows(out / "per_label.csv")[0]


def test_correction_by_hand_and_the_interval_shrinks_with_more_evidence():
    small, large = Evidence("x", 0.5, 8, 10, 9), Evidence("x", 0.5, 800, 1000, 900)
    for evidence in (small, large):
        c = correct(100, evidence)
        assert c.estimate == pytest.approx(100 * 0.8 / (8 / 9))  # count x P / R = 90
        assert c.low < 90 < c.high
    assert correct(100, small).high - correct(100, small).low > 2 * (
        correct(100, large).high - correct(100, large).low)  # fmt: skip
    assert small.warning() and large.warning() is None
    assert correct(100, None).estimate is None and correct(100, Evidence("x", 0.5, 0, 5, 9)).estimate is None


def test_evidence_saved_by_training_is_read_back_as_counts():
    info = BundleInfo(architecture="fasterrcnn_mobilenet_v3_large_fpn", labels=["cell", "dust"])
    info.class_thresholds = {"cell": 0.61}
    info.metrics = {"calibration": {"per_class": {
        "cell": {"threshold": 0.61, "precision": 0.8, "recall": 0.8, "gt": 50},
        "dust": {"threshold": None, "precision": 0.0, "recall": 0.0, "gt": 4}}}}  # fmt: skip
    assert evidence_from_bundle(info, None) == {"cell": Evidence("cell", 0.61, 40, 50, 50)}
    assert evidence_from_bundle(info, 0.3) == {}  # another threshold: no evidence saved for it


@pytest.fixture(scope="module")
def project(request) -> Iterator[dict[str, Path]]:
    """A validation export, and 48 other generated images spread over six sample folders."""
    with module_dir(request, "count") as base:
        yield _project(base)


def _project(base: Path) -> dict[str, Path]:
    validation = generate(base / "val", seed=5, train=30, val=10, empty=0, formats=("cvat",), zipped=False)
    counted = generate(base / "new", seed=6, train=40, val=8, empty=0, formats=("cvat",), zipped=False)
    images = base / "samples"
    truth: dict[str, Counter] = {}
    for k, im in enumerate(load_dataset([counted["cvat"]]).images):
        sample = f"station-{k % SAMPLES}"
        (images / sample).mkdir(parents=True, exist_ok=True)
        shutil.copy(im.path, images / sample / im.path.name)
        truth.setdefault(sample, Counter()).update(s.label for s in im.shapes)
    bundle = make_bundle(base / "run", LABELS, threshold=0.5, min_size=64, max_size=96)
    return {"validation": validation["cvat"], "counted": counted["cvat"], "images": images,
            "truth": truth, "bundle": bundle}  # fmt: skip


def learn(truth: dict, export: Path) -> None:
    """Let the stand-in know the objects of an export's images (by their decoded pixels)."""
    for im in load_dataset([export]).images:
        truth[hashlib.sha1(read_image(im.path).tobytes()).hexdigest()] = im.shapes


@pytest.fixture
def known_rates(monkeypatch, project) -> dict:
    """Every Detector the command builds answers with the stand-in of known error rates; returns
    what it knows, so a test can add images."""
    truth: dict = {}
    for export in (project["validation"], project["counted"]):
        learn(truth, export)

    class KnownRates(Detector):
        def detect(self, image: np.ndarray, threshold: float | None = None) -> Detections:
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            rng = np.random.default_rng(int(digest[:8], 16))
            kept = [s for s in truth[digest] if rng.random() < RECALL]
            boxes = [s.box for s in kept]
            labels = [s.label for s in kept]
            if rng.random() < FALSE_ALARM:  # a false box where no object is
                boxes.append((0.0, 0.0, 3.0, 3.0))
                labels.append(LABELS[int(rng.integers(3))])
            return Detections(np.array(boxes, dtype=np.float32).reshape(-1, 4),
                              np.full(len(boxes), 0.9, dtype=np.float32), labels)  # fmt: skip

    monkeypatch.setattr(detector_module, "Detector", KnownRates)
    return truth


def test_corrected_counts_find_the_true_counts(project, known_rates, tmp_path, capsys):
    out = tmp_path / "counts"
    argv = ["count", "--model", str(project["bundle"]), "--images", str(project["images"]),
            "--threshold", "0.5", "--validation", str(project["validation"]), "--out", str(out),
            "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == []  # validation holds enough of every label
    truth = project["truth"]
    for row in report["per_label"]:  # the totals: every true count inside its interval
        true = sum(counts[row["label"]] for counts in truth.values())
        assert row["low"] <= true <= row["high"], (row, true)
    samples = report["per_sample"]
    assert len(samples) == SAMPLES * len(LABELS)
    errors = np.array([(r["corrected"] - truth[r["sample"]][r["label"]],
                        r["total"] - truth[r["sample"]][r["label"]]) for r in samples])  # fmt: skip
    assert abs(errors[:, 0].mean()) < 0.5 * abs(errors[:, 1].mean())  # the bias is gone...
    assert np.abs(errors[:, 0]).mean() < np.abs(errors[:, 1]).mean()  # ...and the counts are closer
    covered = [r["low"] <= truth[r["sample"]][r["label"]] <= r["high"] for r in samples]
    assert sum(covered) >= 0.8 * len(samples)  # 95 % intervals, 18 of them


def test_a_small_validation_set_is_warned_about(project, known_rates, tmp_path, capsys):
    small = generate(tmp_path / "small", seed=7, train=2, val=1, empty=0, formats=("cvat",))["cvat"]
    learn(known_rates, small)
    argv = ["count", "--model", str(project["bundle"]), "--images", str(project["images"]),
            "--validation", str(small), "--out", str(tmp_path / "c"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"at least {MIN_GT}" in captured.err and "too little evidence" in captured.err
    assert "corrected [95 % interval]" in captured.out
