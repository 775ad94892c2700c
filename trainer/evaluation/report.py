"""The human and machine reports of an evaluation: results.txt and metrics.json.

Both are written atomically beside the bundle (or into an evaluate ``--out`` folder), so a crash
never leaves a half report that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serverless.bundle import METRICS_JSON, RESULTS_TXT, atomic_write
from trainer.evaluation.calibration import Calibration
from trainer.evaluation.metrics import EvalResult


def metrics_dict(result: EvalResult, calibration: Calibration | None) -> dict[str, Any]:
    """The metrics.json object (also what ``evaluate --json`` prints)."""
    return {**result.to_dict(), "calibration": calibration.to_dict() if calibration else None}


def format_table(result: EvalResult, calibration: Calibration | None) -> str:
    """Per-class AP table with the calibrated thresholds; the last row is over all classes."""
    header = ["Class", "GT", "AP", "AP50", "AP75"]
    if calibration is not None:
        header += ["Thr", "P", "R", "F1"]
    rows = [header]
    for name, stats in result.per_class.items():
        row = [name, str(stats["gt"]), _num(stats["AP"]), _num(stats["AP50"]), _num(stats["AP75"])]
        if calibration is not None:
            curve = calibration.per_class[name].summary()
            row += [
                _num(calibration.class_thresholds.get(name)),
                _num(curve["precision"]),
                _num(curve["recall"]),
                _num(curve["f1"]),
            ]
        rows.append(row)
    total = sum(stats["gt"] for stats in result.per_class.values())
    row = ["all", str(total), _num(result.mAP), _num(result.mAP50), _num(result.mAP75)]
    if calibration is not None:
        row += [
            _num(calibration.threshold),
            _num(calibration.precision),
            _num(calibration.recall),
            _num(calibration.f1),
        ]
    rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_results(result: EvalResult, calibration: Calibration | None) -> str:
    """The full results.txt text: COCO summary, per-class table, what the thresholds mean."""
    objects = sum(stats["gt"] for stats in result.per_class.values())
    parts = [
        f"COCO {result.iou_type} evaluation: {result.images} images, {objects} objects, "
        f"{result.detections} detections (at most {result.max_dets} per image)",
        "",
        *result.summary,
        "(-1.000: no ground-truth object in that area range)",
        "",
        format_table(result, calibration),
    ]
    parts += ["", "AP: mean over IoU 0.50:0.95 (COCO mAP); AP50, AP75: at IoU 0.50, 0.75."]
    if calibration is not None:
        parts += [
            f"Thr: the score threshold with the best F1 at IoU {calibration.iou:.2f}, per class "
            "('-': no evidence there,",
            "the 'all' threshold applies); P, R, F1: precision, recall and F1 at that threshold.",
        ]
    return "\n".join(parts) + "\n"


def write_reports(
    run_dir: str | Path,
    result: EvalResult,
    calibration: Calibration | None,
    *,
    prefix: str = "",
) -> None:
    """Write ``<prefix>results.txt`` and ``<prefix>metrics.json`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = format_results(result, calibration)
    data = json.dumps(metrics_dict(result, calibration), indent=2, allow_nan=False) + "\n"
    atomic_write(run_dir / f"{prefix}{RESULTS_TXT}", lambda f: f.write(text.encode()))
    atomic_write(run_dir / f"{prefix}{METRICS_JSON}", lambda f: f.write(data.encode()))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
