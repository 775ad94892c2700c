"""The GPU suite keeps running: its quick mode on the CPU goes through every section's code (the
figures of a CPU and of tiny sizes mean nothing; that each section prints its figures does)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serverless.detector import Detections

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

EXPECTED = [
    r"device: CPU, \d+ threads",
    r"dtype path: fp32 \(cpu: ",
    r"320x180 JPEG: handler [\d.]+ ms/frame \(forward [\d.]+ ms, \d+ shapes\), "
    r"CVAT-style [\d.]+ ms/frame -> [\d.]+x",
    r"408x341 PNG: handler [\d.]+ ms/frame .* -> [\d.]+x",
    r"3 frames 320x180 JPEG, decoding as chosen \(PIL\): [\d.]+ frames/s, [\d.]+% of the time outside",
    r"3 frames 320x180 JPEG, decoding PIL only \(PIL\): [\d.]+ frames/s",
    r"trainer \(fp32\): [\d.]+ images/s, peak GPU memory nan GiB",
    r"trainer / references: [\d.]+x",
    r"BCCD cvat_for_images_1.1.zip, fasterrcnn_mobilenet_v3_large_fpn, from scratch, "
    r".*validation mAP50 [\d.]+",
    r"fp32 \(auto\) vs fp32 \(off\) on 2 validation frames: "
    r"100.0% of \d+ and 100.0% of \d+ detections matched",
    r"suite finished in [\d.]+ min",
]


@pytest.mark.slow
def test_quick_mode_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CVAT_DETECTOR_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for pattern in EXPECTED:
        assert re.search(pattern, done.stdout), f"no line matches {pattern!r} in:\n{done.stdout[-3000:]}"


def test_without_a_gpu_the_full_suite_says_so():
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PYTHON": sys.executable,
                                                       "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stderr


def test_script_is_shellcheck_clean():
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=venv_bin) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not installed: pip install -e '.[dev]'"
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _detections(*rows: tuple[list[float], float, str]) -> Detections:
    return Detections(boxes=np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4),
                      scores=np.array([r[1] for r in rows], dtype=np.float32), labels=[r[2] for r in rows])


def test_dtype_agreement_matches_by_label_and_box_overlap():
    from gpu_suite import agreement

    a = _detections(([0, 0, 10, 10], 0.9, "RBC"), ([20, 20, 30, 30], 0.8, "WBC"),
                    ([50, 50, 60, 60], 0.7, "RBC"))
    b = _detections(([0, 0, 10, 10.5], 0.85, "RBC"),  # IoU 100/105 = 0.952: the same detection
                    ([20, 20, 30, 30], 0.8, "RBC"),  # same box, other label: not the same
                    ([51, 50, 61, 60], 0.7, "RBC"))  # IoU 90/110 = 0.818 < 0.9: not the same
    matched, total, score_difference = agreement(a, b)
    assert (matched, total) == (1, 3) and score_difference == pytest.approx(0.05, abs=1e-6)
    assert agreement(a, _detections()) == (0, 3, 0.0)


def test_a_minutes_budget_sizes_the_run_from_a_timed_epoch(monkeypatch, tmp_path):
    import bench_accuracy_bccd

    runs = []

    def train(argv: list[str], tag: str = "") -> dict[str, float]:
        runs.append(argv[argv.index("--epochs") + 1])
        return {"plan": 20.0, "epoch": 50.0, "end": 70.0}  # set-up 20 s, an epoch 30 s, finish 20 s

    monkeypatch.setattr(bench_accuracy_bccd, "train", train)
    # 240 s: 70 spent; a run of E epochs costs 40 + 30 E -> E = 4 (230 s in all)
    assert bench_accuracy_bccd.train_for(4, ["data.zip"], tmp_path) == 4 and runs == ["1", "4"]
    runs.clear()
    assert bench_accuracy_bccd.train_for(2.5, ["data.zip"], tmp_path) == 1 and runs == ["1"]  # no room
