"""``python -m trainer train`` end to end on generated CVAT exports (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from serverless.detector import Detector
from trainer.commands import main
from trainer.data.synth import generate
from trainer.training import engine

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--weights", "none", "--device", "cpu",
        "--roi-batch-size", "64", "--workers", "0", "--patience", "0"]


@pytest.fixture(scope="module")
def learnt(tmp_path_factory) -> Path:
    """A run trained long enough that a broken loss, box format or label offset would show."""
    base = tmp_path_factory.mktemp("learn")
    export = generate(base / "data", seed=1, train=32, val=12, empty=2, labels=("circle", "square"),
                      formats=("cvat",))["cvat"]
    run = base / "run"
    code = main(["train", str(export), "--out", str(run), "--epochs", "10", "--image-size", "224",
                 "--warmup-iters", "30", "--lr", "0.02", *FAST])
    assert code == 0
    return run


@pytest.mark.slow
def test_training_learns_the_generated_objects(learnt):
    metrics = json.loads((learnt / "metrics.json").read_text())
    assert metrics["mAP50"] >= 0.3, metrics["summary"]


def test_run_holds_the_bundle_reports_and_plots(learnt):
    info = json.loads((learnt / "model.json").read_text())
    assert info["labels"] == ["circle", "square"]
    assert info["architecture"] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert 0.0 < info["threshold"] < 1.0
    assert set(info["class_thresholds"]) == {"circle", "square"}
    assert info["provenance"]["data"]["objects"] > 0 and info["provenance"]["epochs_run"] == 10
    sizing = info["provenance"]["sizing"]  # what train chose and why, with the object sizes it saw
    assert sizing["how"] == {"image_size": "given", "anchors": "fitted to the training boxes"}
    assert info["anchors"] == sizing["anchors"] and len(info["anchors"]["sizes"]) == 3
    assert set(sizing["objects"]) == {"circle", "square"} and info["min_size"] == 224
    for name in ("weights.pt", "labels.txt", "results.txt", "metrics.json", "history.csv",
                 "config.yaml"):
        assert (learnt / name).stat().st_size > 0, name
    assert len(list((learnt / "plots").glob("*.png"))) >= 3
    rows = (learnt / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 11


def test_bundle_loads_in_the_runtime_without_trainer(learnt):
    code = (
        "import sys, numpy as np\n"
        "from serverless.detector import Detector\n"
        f"d = Detector({str(learnt)!r}, 'cpu')\n"
        "d.detect(np.zeros((240, 320, 3), np.uint8))\n"
        "assert not [m for m in sys.modules if m == 'trainer' or m.startswith('trainer.')]\n"
        "print(d.labels)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "circle" in out.stdout


def test_existing_run_is_not_overwritten(learnt, capsys):
    before = (learnt / "weights.pt").stat().st_mtime_ns
    assert main(["train", "unused.zip", "--out", str(learnt), *FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (learnt / "weights.pt").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    return generate(base, seed=2, train=6, val=3, empty=0, size=(160, 128), formats=("cvat",))["cvat"]


def _tiny(export: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(export), "--out", str(out), "--epochs", "3", "--image-size", "128",
            "--batch-size", "2", "--warmup-iters", "2", *FAST, *extra]


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_export, tmp_path, monkeypatch):
    assert main(_tiny(tiny_export, tmp_path / "straight")) == 0
    real, calls = engine.train_one_epoch, []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("trainer.training.run.train_one_epoch", crash_in_third_epoch)
    assert main(_tiny(tiny_export, tmp_path / "crashed")) == 130
    assert not (tmp_path / "crashed" / "model.json").exists()
    monkeypatch.setattr("trainer.training.run.train_one_epoch", real)
    assert main(_tiny(tiny_export, tmp_path / "crashed", "--resume")) == 0
    a = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_unknown_architecture_is_a_clear_error(tiny_export, tmp_path, capsys):
    assert main(["train", str(tiny_export), "--out", str(tmp_path / "r"), "--arch", "yolo"]) == 2
    assert "unknown architecture 'yolo'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_export, tmp_path):
    """torchrun with the gloo backend: ranks share the batches, rank 0 writes the bundle."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "trainer", *_tiny(tiny_export, out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "model.json").read_text())
    assert info["provenance"]["split"]["train"] == 6
    assert "2 x cpu" in result.stdout


def test_mask_rcnn_trains_on_polygons_and_masks_and_serves_masks(tmp_path):
    export = generate(tmp_path / "data", seed=3, train=4, val=2, empty=0, size=(128, 96), shapes="mixed",
                      formats=("cvat",))["cvat"]
    out = tmp_path / "masks"
    argv = ["train", str(export), "--out", str(out), "--arch", "maskrcnn_resnet50_fpn_v2",
            "--weights", "none", "--device", "cpu", "--epochs", "1", "--image-size", "96",
            "--batch-size", "2", "--workers", "0", "--roi-batch-size", "32", "--detections-per-img", "10"]
    assert main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["shape_type"] == "mask" and info["architecture"] == "maskrcnn_resnet50_fpn_v2"
    detector = Detector(out, "cpu")
    found = detector.detect(np.full((96, 128, 3), 200, np.uint8), threshold=0.0)
    assert detector.has_masks and len(found.masks) == len(found) > 0
