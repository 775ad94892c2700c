"""Pictures of a run: loss/mAP history, precision-recall and F1 curves, predictions on images.

matplotlib is used through ``Figure`` objects with the Agg canvas, never pyplot, so plotting works
headless and in worker threads.
Every PNG is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_utils
from matplotlib import colormaps, font_manager
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from serverless.bundle import HISTORY_CSV, PLOTS, atomic_write
from trainer.evaluation.calibration import Calibration, Curve


class Sample(NamedTuple):
    """One image to draw: RGB uint8 pixels, its predictions and (optionally) its ground truth."""

    image: np.ndarray
    pred: dict
    gt: dict | None = None


def plot_history(csv_path: str | Path, out_png: str | Path) -> None:
    """Loss, mAP and learning rate per epoch, from the training CSV (empty cells are skipped)."""
    columns = _read_columns(Path(csv_path))
    if "epoch" not in columns:
        raise ValueError(f"{csv_path}: no 'epoch' column")
    epochs = columns["epoch"]
    panels = [
        ("loss", [c for c in columns if "loss" in c]),
        ("mAP", [c for c in columns if c.startswith("val_") and "loss" not in c]),
        ("learning rate", [c for c in columns if c == "lr"]),
    ]
    panels = [(title, names) for title, names in panels if names]
    fig = _figure(figsize=(5 * len(panels), 4))
    for i, (title, names) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for name in names:
            valid = ~np.isnan(columns[name])
            ax.plot(epochs[valid], columns[name][valid], marker="o", markersize=3, label=name)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _save(fig, out_png)


def plot_pr_curves(calibration: Calibration, out_png: str | Path) -> None:
    """Precision against recall per class (IoU 0.5), the chosen operating point marked."""
    fig = _figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for name, curve in calibration.per_class.items():
        best = curve.best()
        f1 = f" F1 {curve.f1[best[1]]:.2f}" if best else ""
        (line,) = ax.plot(curve.recall, curve.precision, drawstyle="steps-post", label=name + f1)
        if best:
            ax.plot(curve.recall[best[1]], curve.precision[best[1]], "o", color=line.get_color())
    pooled = calibration.pooled
    ax.plot(pooled.recall, pooled.precision, "k--", lw=2, label=f"all F1 {calibration.f1:.2f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title(f"Precision-recall at IoU {calibration.iou:.2f}")
    _finish(fig, ax, len(calibration.per_class))
    _save(fig, out_png)


def plot_f1(calibration: Calibration, out_png: str | Path) -> None:
    """F1 against score threshold, pooled and per class, with the chosen threshold."""
    fig = _figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for name, curve in calibration.per_class.items():
        ax.plot(*_f1_steps(curve), lw=1, drawstyle="steps-post", label=name)
    ax.plot(*_f1_steps(calibration.pooled), "k", lw=2.5, drawstyle="steps-post", label="all")
    ax.axvline(calibration.threshold, color="red", ls=":", lw=1.5)
    ax.plot(calibration.threshold, calibration.f1, "o", color="red")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="score threshold", ylabel="F1")
    ax.set_title(
        f"F1 at IoU {calibration.iou:.2f}: threshold {calibration.threshold:.3f} "
        f"gives F1 {calibration.f1:.3f}"
    )
    _finish(fig, ax, len(calibration.per_class))
    _save(fig, out_png)


def _f1_steps(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """F1 is constant between consecutive scores; nothing is kept above the top one."""
    x = np.r_[np.max(curve.thresholds, initial=1.0), curve.thresholds, 0.0]
    y = np.r_[0.0, curve.f1, curve.f1[-1:] if len(curve.f1) else 0.0]
    return x, y


def draw_predictions(
    image_rgb: np.ndarray,
    pred: dict,
    labels: Sequence[str],
    out_png: str | Path,
    gt: dict | None = None,
) -> None:
    """The image with predicted boxes (class colour, "label score"), tinted masks, white truth."""
    image = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)
    classes = np.asarray(pred["labels"], dtype=np.int64).reshape(-1)
    colors = [_class_color(c, len(labels)) for c in classes]
    masks = pred.get("masks")
    if masks is not None and len(classes):
        masks = torch.from_numpy(_full_masks(masks, image.shape[1:]))
        image = draw_segmentation_masks(image, masks, alpha=0.4, colors=colors)
    font, size = _font(image.shape[1:])
    if gt is not None and len(gt["boxes"]):
        image = draw_bounding_boxes(image, _boxes(gt["boxes"]), colors="white", width=1)
    if len(classes):
        names = [
            f"{labels[c - 1]} {s:.2f}"
            for c, s in zip(classes, np.asarray(pred["scores"]).tolist(), strict=True)
        ]
        width = max(1, round(size / 6))
        image = draw_bounding_boxes(
            image,
            _boxes(pred["boxes"]),
            names,
            colors,
            width=width,
            font=font,
            font_size=size,
            fill_labels=True,  # black text on the class colour: readable over tinted masks
        )
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    _write(out_png, buffer)


def write_plots(
    run_dir: str | Path, calibration: Calibration, samples: Sequence[Sample] = ()
) -> list[Path]:
    """Every plot of a run into ``run_dir/plots``: curves, history (when the run has its CSV),
    and ``sample_<n>.png`` per sample, drawn at the calibrated class thresholds as CVAT would
    show them. Returns the paths written."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS
    written = [out / "pr_curves.png", out / "f1_curve.png"]
    plot_pr_curves(calibration, written[0])
    plot_f1(calibration, written[1])
    if (run_dir / HISTORY_CSV).exists():
        written.append(out / "history.png")
        plot_history(run_dir / HISTORY_CSV, written[-1])
    for n, (image, pred, gt) in enumerate(samples, start=1):
        written.append(out / f"sample_{n}.png")
        draw_predictions(image, calibration.select(pred), calibration.labels, written[-1], gt=gt)
    return written


def _read_columns(path: Path) -> dict[str, np.ndarray]:
    """Numeric CSV columns as float arrays (NaN where a cell is empty or not a number)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0]) if rows else []
    return {name: np.array([_float(row.get(name)) for row in rows]) for name in names}


def _float(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value


def _figure(figsize: tuple[float, float]) -> Any:
    return Figure(figsize=figsize, dpi=100, layout="constrained")


def _finish(fig: Any, ax: Any, classes: int) -> None:
    """Grid and a legend beside the axes (skipped when there are too many classes to read)."""
    ax.grid(alpha=0.3)
    if classes <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def _save(fig: Any, out_png: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _write(out_png, buffer)


def _write(out_png: str | Path, buffer: io.BytesIO) -> None:
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda f: f.write(buffer.getvalue()))


def _class_color(class_id: int, num_classes: int) -> tuple[int, int, int]:
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    r, g, b, _ = cmap((class_id - 1) % cmap.N)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(hw: Sequence[int]) -> tuple[str, int]:
    """matplotlib's bundled DejaVu Sans, sized to the image so labels stay legible."""
    return font_manager.findfont("DejaVu Sans"), max(10, min(hw) // 40)


def _boxes(boxes: Any) -> Any:
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])  # degenerate boxes still draw
    return boxes


def _full_masks(masks: Any, hw: Sequence[int]) -> np.ndarray:
    """(N, H, W) bool from bool arrays or COCO RLE dicts."""
    if isinstance(masks, np.ndarray):
        return masks.astype(bool).reshape(-1, *hw)
    return np.moveaxis(mask_utils.decode(list(masks)), -1, 0).astype(bool)
