"""The annotate → train → pre-annotate → correct → retrain loop, on generated task exports.

An export without subsets grows by 20% and loses a few images; a run trained on it and its retrain
must never have validated on an image either of them trained on, and ``evaluate`` of the first run
must score exactly its recorded validation images. Runs without validation end with a complete
bundle; a model that has learnt nothing is not stopped early and says so.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serverless.detector import Detector
from tests.conftest import module_dir
from tests.factories import write_task_export
from trainer.commands import main
from trainer.data.readers import load_dataset
from trainer.data.splits import SplitOptions, read_split, split_data
from trainer.evaluation import metrics
from trainer.training import run as training_run

FAST = ["--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--weights", "none", "--device", "cpu",
        "--image-size", "128", "--workers", "0", "--roi-batch-size", "32", "--batch-size", "8",
        "--warmup-iters", "2"]


def roles(run) -> dict[str, set[str]]:
    return read_split(run).roles


@pytest.fixture(scope="module")
def loop(request):
    """v1: frames 0-19; v2: 3 removed, 4 added (+20%); run1 on v1, run2 retrained from run1 on v2."""
    with module_dir(request, "loop") as base:
        v1 = write_task_export(base / "v1", range(20))
        v2 = write_task_export(base / "v2", range(3, 24))
        run1, run2 = base / "run1", base / "run2"
        common = ["--epochs", "1", "--val-fraction", "0.3"]
        assert main(["train", str(v1), "--out", str(run1), *common, *FAST]) == 0
        retrain = [a if a != "none" else str(run1) for a in FAST]  # --weights run1
        assert main(["train", str(v2), "--out", str(run2), *common, *retrain]) == 0
        yield SimpleNamespace(v1=v1, v2=v2, run1=run1, run2=run2)


@pytest.mark.slow
def test_no_image_ever_validates_one_run_and_trains_another(loop):
    first, second = roles(loop.run1), roles(loop.run2)
    trained = first["train"] | second["train"]
    held_out = first["val"] | first["test"] | second["val"] | second["test"]
    assert first["val"] and second["val"]
    assert not trained & held_out
    v2_images = {f"default/img_{i:03d}.png" for i in range(3, 24)}
    assert first["val"] & v2_images <= second["val"]  # the retrain kept the parent's validation set
    assert first["train"] | first["val"] | first["test"] == {f"default/img_{i:03d}.png" for i in range(20)}
    assert second["train"] | second["val"] | second["test"] == v2_images
    provenance = json.loads((loop.run2 / "model.json").read_text())["provenance"]
    assert provenance["parent"]["run"] == str(loop.run1.resolve())
    assert provenance["split_options"]["parent"] == str(loop.run1)


@pytest.mark.slow
def test_evaluate_scores_exactly_the_recorded_validation_images(loop, monkeypatch, capsys):
    seen = []
    real = metrics.predict_records

    def spy(detector, records, **kwargs):
        seen.extend(im.identity for im in records)
        return real(detector, records, **kwargs)

    monkeypatch.setattr(metrics, "predict_records", spy)
    assert main(["evaluate", str(loop.run1), str(loop.v2), "--device", "cpu", "--json"]) == 0
    recorded = roles(loop.run1)["val"]
    in_v2 = {f"default/img_{i:03d}.png" for i in range(3, 24)}
    assert sorted(seen) == sorted(recorded & in_v2)
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images"] == len(recorded & in_v2)
    kept, missing = len(recorded & in_v2), len(recorded - in_v2)
    counts = f"{len(recorded)} recorded, {kept} in this data, {missing} missing"
    assert counts in captured.err
    assert "4 images of this data are new" in captured.err


@pytest.mark.slow
def test_evaluating_training_images_says_so_loudly(loop, tmp_path, capsys):
    few = write_task_export(tmp_path / "few", range(6))  # six images of v1
    assert main(["evaluate", str(loop.run1), str(few), "--device", "cpu", "--subset", "all"]) == 0
    trained = len(roles(loop.run1)["train"] & {f"default/img_{i:03d}.png" for i in range(6)})
    assert trained and f"WARNING: {trained} of these 6 images are training images" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_tells_which_annotations_a_run_saw(loop, capsys):
    assert main(["inspect", str(loop.run2)]) == 0
    out = capsys.readouterr().out
    assert f"annotations: {loop.v2}" in out and f"parent: {loop.run1.resolve()}" in out
    assert f"annotations: {loop.v1}" in out  # the parent's


@pytest.mark.slow
def test_a_run_without_validation_ends_with_a_complete_bundle(tmp_path, capsys):
    export = write_task_export(tmp_path / "v", range(4))
    out = tmp_path / "run"
    argv = ["train", str(export), "--out", str(out), "--epochs", "3", "--patience", "1",
            "--val-fraction", "0", *FAST]
    assert main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["threshold"] == 0.5 and info["class_thresholds"] == {}
    assert info["provenance"]["epochs_run"] == 3 and info["provenance"]["best_epoch"] == 3
    assert "nothing was evaluated or calibrated" in (out / "results.txt").read_text()
    assert json.loads((out / "metrics.json").read_text())["calibration"] is None
    assert roles(out)["val"] == set()
    assert len(Detector(out, "cpu").labels) == 1
    assert main(["evaluate", str(out), str(export), "--device", "cpu"]) == 2  # nothing to default to
    assert "trained without validation images" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_that_learnt_nothing_is_not_stopped_and_says_so(tmp_path, monkeypatch):
    """Validation finds nothing (mAP 0 every epoch): patience 1 must not stop the run."""

    def blind(run):
        gts = [metrics.record_target(r, run.val_set.class_of) for r in run.val_set.records]
        nothing = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
        return gts, [nothing] * len(gts)

    monkeypatch.setattr(training_run, "validate", blind)
    export = write_task_export(tmp_path / "v", range(6))  # img_002 is the one validation image
    out = tmp_path / "run"
    argv = ["train", str(export), "--out", str(out), "--epochs", "3", "--patience", "1",
            "--val-fraction", "0.3", *FAST]
    assert main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["provenance"]["epochs_run"] == 3 and info["provenance"]["best_epoch"] == 3
    assert "has not learnt to find the objects yet" in (out / "results.txt").read_text()


def _hash_point(identity: str, seed: int = 0) -> float:
    """docs/data.md: the point in [0, 1) that SHA-256 of the seed and the identity gives an image."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{identity}".encode()).digest()[:8], "big") / 2.0**64


def test_too_few_images_to_hold_one_out_train_without_validation(tmp_path):
    """Frames 2 and 8 both fall in the validation band at 0.2: training needs one, so both train."""
    points = {i: _hash_point(f"default/img_{i:03d}.png") for i in (2, 3, 8)}
    assert points[2] < 0.2 and points[8] < 0.2 <= points[3]
    options = SplitOptions(val_fraction=0.2)
    both_held_out = split_data(load_dataset([write_task_export(tmp_path / "a", [2, 8])]), options)
    assert [im.name for im in both_held_out["train"]] == ["img_002.png", "img_008.png"]
    assert not both_held_out["val"] and both_held_out.notes
    one_trains = split_data(load_dataset([write_task_export(tmp_path / "b", [2, 3])]), options)
    assert [im.name for im in one_trains["val"]] == ["img_002.png"]  # the hash's own role
    assert [im.name for im in one_trains["train"]] == ["img_003.png"]


class _Run(SimpleNamespace):
    """What record_epoch touches of a run."""


@pytest.mark.parametrize(
    ("maps", "patience", "best", "stops_after"),
    [([0.2, 0.2, 0.1, 0.1], 2, 2, 3),  # a tie goes to the later epoch, but is no gain
     ([0.3, 0.3, 0.3], 1, 2, 2),  # a plateau stops
     ([0.0] * 5, 1, 5, None),  # mAP 0: the model learnt nothing yet, no early stop
     ([None] * 4, 1, 4, None),  # no validation: every epoch runs, the last is kept
     ([0.1, 0.3, 0.2], 0, 2, None)],  # patience 0: never
)  # fmt: skip
def test_best_epoch_and_early_stopping(maps, patience, best, stops_after, tmp_path, monkeypatch):
    monkeypatch.setattr(training_run, "save_checkpoint", lambda run: None)
    run = _Run(out=tmp_path, net=torch.nn.Linear(1, 1), progress=training_run.Progress(),
               config=SimpleNamespace(epochs=len(maps), patience=patience))
    stopped = None
    for epoch, value in enumerate(maps):
        metrics_ = {} if value is None else {"val_mAP": value, "val_mAP50": value}
        if training_run.record_epoch(run, epoch, {"loss": 1.0, "lr": 0.1, "images_per_s": 1.0}, metrics_):
            stopped = epoch + 1
            break
    assert run.progress.best_epoch + 1 == best
    assert stopped == stops_after
