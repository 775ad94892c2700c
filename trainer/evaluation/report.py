"""The human and machine reports of an evaluation: results.txt and metrics.json.

Both are written atomically beside the bundle (or into an evaluate ``--out`` folder), so a crash
never leaves a half report that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serverless.bundle import METRICS_JSON, RESULTS_TXT, BundleInfo, atomic_write
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
    if calibration is not None:
        lines.append(f"thresholds: {calibration.applied()}")
    return "\n".join(lines)


def format_results(
    result: EvalResult, calibration: Calibration | None, header: list[str] | None = None
) -> str:
    """The full results.txt text: ``header`` lines (what was evaluated, where the model came
    from), COCO summary, per-class table, what the thresholds mean."""
    objects = sum(stats["gt"] for stats in result.per_class.values())
    parts = [*(header or []), *([""] if header else []),
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
            f"('-': fewer than {calibration.min_matches} matched",
            "objects of the class, the 'all' threshold applies); P, R, F1: precision, recall and F1 "
            "at the class's best cut.",
        ]
    return "\n".join(parts) + "\n"


def write_reports(
    run_dir: str | Path,
    result: EvalResult | None,
    calibration: Calibration | None,
    *,
    prefix: str = "",
    header: list[str] | None = None,
    notes: list[str] | None = None,
) -> None:
    """Write ``<prefix>results.txt`` and ``<prefix>metrics.json`` into ``run_dir``.

    ``notes`` (what the user must know about these numbers) end the text and go into the JSON;
    without a ``result`` (a run without validation images) they are the whole report.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    if result is None:
        text = "\n".join([*(header or []), *([""] if header else []), *notes]) + "\n"
        content: dict[str, Any] = {"mAP": None, "mAP50": None, "calibration": None}
    else:
        text = format_results(result, calibration, header) + "".join(f"\n{note}\n" for note in notes)
        content = metrics_dict(result, calibration)
    data = json.dumps({**content, "notes": notes}, indent=2, allow_nan=False) + "\n"
    atomic_write(run_dir / f"{prefix}{RESULTS_TXT}", lambda f: f.write(text.encode()))
    atomic_write(run_dir / f"{prefix}{METRICS_JSON}", lambda f: f.write(data.encode()))


def bundle_thresholds(info: BundleInfo) -> str:
    """The thresholds a bundle's function applies when CVAT sends none, in words."""
    own = ", ".join(f"{name} {value:.3f}" for name, value in info.class_thresholds.items())
    rest = [name for name in info.labels if name not in info.class_thresholds]
    text = f"{own} (own)" if own else ""
    if rest:
        text += ("; " if text else "") + f"{info.threshold:.3f} for {', '.join(rest)}"
    return text


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Where a run's model came from, for results.txt and ``inspect RUN``: its annotations
    (exports, or the server, project/tasks and when they were read), its start, its parent runs."""
    data = provenance.get("data", {})
    lines = [f"trained {provenance.get('created', '?')} on {data.get('images', '?')} images"
             f" ({', '.join(f'{k} {v}' for k, v in provenance.get('split', {}).items())})"]
    lines += _origin_lines(data.get("server"), data.get("sources", []))
    weights = provenance.get("weights", {})
    lines.append(f"  started from: {weights.get('kind', '?')} {weights.get('source', '')}".rstrip())
    parent, depth = provenance.get("parent"), 1
    while parent:
        lines.append(f"  {'parent' if depth == 1 else 'ancestor'}: {parent.get('run')} "
                     f"(trained {parent.get('created')}, from {parent.get('weights')})")
        lines += ["  " + line for line in _origin_lines(parent.get("server"), parent.get("sources") or [])]
        parent, depth = parent.get("parent"), depth + 1
    return lines


def _origin_lines(server: dict[str, Any] | None, sources: list[str]) -> list[str]:
    if server:
        what = f"project {server['project']}" if server.get("project") else ""
        what += (" and " if what and server.get("tasks") else "") + (
            f"tasks {', '.join(map(str, server['tasks']))}" if server.get("tasks") else "")
        return [f"  annotations: {server.get('url')} {what}, read {server.get('read_at')}"]
    return [f"  annotations: {', '.join(sources) or '?'}"]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
