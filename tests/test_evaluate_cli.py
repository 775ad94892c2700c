"""``python -m trainer evaluate``: an untrained bundle over a generated export, and its errors."""

from __future__ import annotations

import json

import pytest

from trainer.commands import main


@pytest.fixture(scope="module")
def bundle(shared_bundle):
    """Knows two of the export's labels (circle, square) and one it lacks (rod)."""
    return shared_bundle(["square", "circle", "rod"])


def test_evaluate_prints_json_and_writes_reports(bundle, synth_exports, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", str(bundle), str(synth_exports["cvat"]), "--json", "--device", "cpu"]
    code = main([*argv, "--out", str(out)])  # default: the validation split (4 images)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out)
    assert set(metrics) >= {"mAP", "mAP50", "per_class", "calibration"}
    assert list(metrics["per_class"]) == ["square", "circle", "rod"]
    for stats in metrics["per_class"].values():
        assert set(stats) >= {"AP", "AP50"}
    assert metrics["per_class"]["rod"]["AP"] is None
    assert metrics["per_class"]["circle"]["gt"] > 0 and metrics["images"] == 4
    assert 0.0 <= metrics["mAP"] <= 1.0
    assert "triangle" in captured.err and "rod" in captured.err  # unscored labels are reported
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "square" in (out / "results.txt").read_text()
    assert (out / "plots" / "f1_curve.png").stat().st_size > 0


def test_evaluate_refuses_a_directory_that_is_not_a_bundle(synth_exports, tmp_path, capsys):
    code = main(["evaluate", str(tmp_path), str(synth_exports["cvat"])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {tmp_path}: no model.json") and "Traceback" not in err


def test_evaluate_refuses_data_without_a_shared_label(synth_exports, shared_bundle, capsys):
    run = shared_bundle(["RBC", "WBC"])
    assert main(["evaluate", str(run), str(synth_exports["coco"]), "--subset", "all"]) == 2
    err = capsys.readouterr().err
    assert "error: no label of the data" in err and "RBC" in err


def test_evaluate_names_the_subsets_when_one_is_empty(bundle, synth_exports, capsys):
    assert main(["evaluate", str(bundle), str(synth_exports["cvat"]), "--subset", "Test"]) == 2
    err = capsys.readouterr().err
    assert "--subset Test: no images" in err and "Train, Validation" in err
