"""``python -m trainer train`` end to end on generated CVAT exports (CPU): resuming, refusals,
several processes. What a trained run scores and serves: test_trained.py; every architecture:
test_architectures.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TRAIN_FAST
from trainer.commands import main
from trainer.data.synth import generate
from trainer.training import engine

ROOT = Path(__file__).resolve().parents[1]


def test_existing_run_is_not_overwritten(shared_bundle, capsys):
    run = shared_bundle(["cell", "debris"])
    before = (run / "weights.pt").stat().st_mtime_ns
    assert main(["train", "unused.zip", "--out", str(run), *TRAIN_FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "weights.pt").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    return generate(base, seed=2, train=6, val=3, empty=0, size=(160, 128), formats=("cvat",))["cvat"]


def _tiny(export: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(export), "--out", str(out), "--epochs", "3", "--image-size", "128",
            "--batch-size", "2", "--warmup-iters", "2", *TRAIN_FAST, *extra]


@pytest.mark.slow
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
