"""Plots: every PNG a run writes is a real, non-empty image; predictions are drawn on images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.evaluation.calibration import calibrate_thresholds
from trainer.evaluation.plots import HISTORY_CSV, draw_predictions, plot_history, write_plots

LABELS = ["cell", "debris"]


def _boxes(rows) -> np.ndarray:
    return np.asarray(rows, dtype=float).reshape(-1, 4)


@pytest.fixture()
def case():
    """Two images: truth, predictions with one miss-scored false alarm, and a calibration."""
    gts = [
        {"boxes": _boxes([[10, 10, 50, 50], [60, 20, 100, 70]]), "labels": np.array([1, 2])},
        {"boxes": _boxes([[20, 30, 60, 80]]), "labels": np.array([1])},
    ]
    preds = [
        {
            "boxes": _boxes([[11, 10, 50, 52], [60, 22, 99, 70], [100, 80, 120, 95]]),
            "labels": np.array([1, 2, 1]),
            "scores": np.array([0.9, 0.75, 0.3]),
        },
        {"boxes": _boxes([[20, 31, 61, 80]]), "labels": np.array([1]), "scores": np.array([0.6])},
    ]
    return gts, preds, calibrate_thresholds(gts, preds, LABELS)


def _png(path) -> np.ndarray:
    assert path.stat().st_size > 100
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_write_plots_writes_every_png(tmp_path, case):
    gts, preds, calibration = case
    (tmp_path / HISTORY_CSV).write_text(
        "epoch,train_loss,lr,val_mAP,val_mAP50,loss_box_reg\n"
        "1,1.2,0.01,0.10,0.30,0.5\n2,0.8,0.008,,,0.4\n3,0.6,0.004,0.40,0.70,0.3\n"
    )
    image = np.full((100, 130, 3), 80, dtype=np.uint8)
    written = write_plots(
        tmp_path, calibration, [(image, preds[0], gts[0]), (image, preds[1], None)]
    )
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == [
        "plots/f1_curve.png",
        "plots/history.png",
        "plots/pr_curves.png",
        "plots/sample_1.png",
        "plots/sample_2.png",
    ]
    for path in written:
        pixels = _png(path)
        if "sample" not in path.name:  # figures: big and not blank
            assert pixels.shape[1] >= 500 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    sample = _png(tmp_path / "plots" / "sample_1.png")
    assert sample.shape == image.shape
    # The 0.3 false alarm is below the calibrated threshold: that corner stays untouched.
    assert (sample[82:94, 102:118] == 80).all()
    assert (sample[10:50, 11] != 80).any()  # the kept "cell" box is drawn


def test_draw_predictions_tints_masks_and_outlines_truth(tmp_path):
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    masks = np.zeros((1, 60, 80), dtype=bool)
    masks[0, 20:40, 30:50] = True
    pred = {
        "boxes": _boxes([[30, 20, 50, 40]]),
        "labels": np.array([2]),
        "scores": np.array([0.8]),
        "masks": masks,
    }
    truth = {"boxes": _boxes([[2, 2, 12, 12]]), "labels": np.array([1])}
    draw_predictions(image, pred, LABELS, tmp_path / "out" / "p.png", gt=truth)
    drawn = np.asarray(Image.open(tmp_path / "out" / "p.png").convert("RGB"))
    assert drawn[35, 40].sum() > 0  # inside the mask: tinted
    assert drawn[5, 30].sum() == 0 and drawn[55, 75].sum() == 0  # elsewhere: untouched
    assert (drawn[2, 2:12] == 255).all()  # the truth box outline is white


def test_draw_predictions_without_detections(tmp_path):
    image = np.full((40, 50, 3), 7, dtype=np.uint8)
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "scores": np.zeros(0)}
    draw_predictions(image, empty, LABELS, tmp_path / "empty.png")
    assert (np.asarray(Image.open(tmp_path / "empty.png")) == 7).all()


def test_plot_history_needs_an_epoch_column(tmp_path):
    (tmp_path / "h.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match="epoch"):
        plot_history(tmp_path / "h.csv", tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()
