"""Object counts a scientist can publish: per image, per sample, per label, with honest error bars.

From annotations, counts are what people drew, with validated labels and not-validated ones
(``<label>_NV``, pre-annotations nobody has confirmed yet) in separate columns. From a model, the
raw count of detections is biased: it misses objects (recall R < 1) and adds false ones
(precision P < 1). On the validation images, at the threshold used, the model found TP of the GT
objects with D detections, so P = TP / D and R = TP / GT. The corrected estimate of the true count
of a sample where the model reports C objects is

    N = C x P / R

and its 95 % interval comes from simulation (:data:`DRAWS` draws, seeded): P and R are drawn from
their Jeffreys posteriors Beta(TP + 1/2, D - TP + 1/2) and Beta(TP + 1/2, GT - TP + 1/2) (the
uncertainty of a small validation set), then the true positives among the C detections from
Binomial(C, P) and the objects missed beside them from a negative binomial with success rate R
(the chance in the sample itself); the interval is the 2.5th to 97.5th percentile. This assumes the
counted images are like the validation images (same kind of images, same error rates). A label
with fewer than :data:`MIN_GT` validation objects or :data:`MIN_TP` found ones gets a warning: its
correction rests on too little evidence.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from trainer.data.options import split_unvalidated

#: Monte Carlo draws of the interval; fixed seed so a table is reproducible.
DRAWS = 4000
SEED = 0
#: Below these, the validation set is too small to support a correction.
MIN_GT = 30
MIN_TP = 10


@dataclass
class ImageCount:
    """The objects of one image: (label, validated) -> count."""

    image: str
    sample: str
    counts: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Evidence:
    """What the validation images say about one label at the threshold used."""

    label: str
    threshold: float
    tp: int  # detections matching a ground-truth object (IoU >= 0.5)
    detections: int
    gt: int

    @property
    def precision(self) -> float:
        return self.tp / self.detections if self.detections else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.gt if self.gt else float("nan")

    def warning(self) -> str | None:
        """Why the correction of this label should not be trusted, or None."""
        if self.gt < MIN_GT or self.tp < MIN_TP:
            return (f"{self.label}: the validation set has {self.gt} object(s), {self.tp} found by the "
                    f"model (at least {MIN_GT} and {MIN_TP} are needed); its corrected counts rest on "
                    "too little evidence")  # fmt: skip
        return None


@dataclass(frozen=True)
class Corrected:
    """A raw count and its corrected estimate with a 95 % interval (None: no correction)."""

    count: int
    estimate: float | None = None
    low: float | None = None
    high: float | None = None


def correct(count: int, evidence: Evidence | None, rng: np.random.Generator | None = None) -> Corrected:
    """``count`` x P / R with its interval (see the module docstring)."""
    if evidence is None or evidence.tp == 0:
        return Corrected(count)
    e = evidence
    rng = rng or np.random.default_rng(SEED)
    p = rng.beta(e.tp + 0.5, e.detections - e.tp + 0.5, DRAWS)
    r = rng.beta(e.tp + 0.5, e.gt - e.tp + 0.5, DRAWS)
    found = rng.binomial(count, p)
    missed = np.where(found > 0, rng.negative_binomial(np.maximum(found, 1), r), 0)
    low, high = np.percentile(found + missed, [2.5, 97.5])
    return Corrected(count, count * e.precision / e.recall, float(low), float(high))


def tabulate(images: Iterable[ImageCount], labels: list[str]) -> dict[str, list[dict]]:
    """Rows of the three tables: per image, per sample, per label; every label on every image
    (a zero is a finding). Columns ``validated``/``not_validated``, their ``total``."""
    images = list(images)
    per_image, per_sample, per_label = [], defaultdict(Counter), defaultdict(Counter)
    sample_images = Counter(im.sample for im in images)
    for im in images:
        for label in labels:
            ok, nv = im.counts[(label, True)], im.counts[(label, False)]
            per_image.append({"image": im.image, "sample": im.sample, "label": label,
                              "validated": ok, "not_validated": nv, "total": ok + nv})  # fmt: skip
            for key, table in (((im.sample, label), per_sample), (label, per_label)):
                table[key].update(validated=ok, not_validated=nv, total=ok + nv)
    samples = [{"sample": s, "label": label, "images": sample_images[s], **_ordered(c)}
               for (s, label), c in per_sample.items()]  # fmt: skip
    totals = [{"label": label, "images": len(images), **_ordered(per_label[label])} for label in labels]
    return {"image": per_image, "sample": samples, "label": totals}


def _ordered(counter: Counter) -> dict[str, int]:
    return {k: int(counter[k]) for k in ("validated", "not_validated", "total")}


def add_corrections(tables: dict[str, list[dict]], evidence: dict[str, Evidence]) -> None:
    """Corrected estimates and intervals for the per-sample and per-label rows (model counts)."""
    rng = np.random.default_rng(SEED)
    for level in ("sample", "label"):
        for row in tables[level]:
            c = correct(row["total"], evidence.get(row["label"]), rng)
            row.update(corrected=_round(c.estimate), low=_round(c.low), high=_round(c.high))


def _round(value: float | None) -> float | str:
    return "" if value is None else round(value, 1)


def evidence_from_bundle(info, threshold: float | None) -> dict[str, Evidence]:
    """Per-label evidence saved in model.json when training calibrated the thresholds; only for
    the calibrated thresholds (a --threshold needs --validation images)."""
    if threshold is not None:
        return {}
    per_class = info.metrics.get("calibration", {}).get("per_class", {})
    found = {}
    for label, s in per_class.items():
        if s.get("threshold") is None or label not in info.class_thresholds or not s.get("gt"):
            continue
        tp = round(s["recall"] * s["gt"])
        detections = round(tp / s["precision"]) if s["precision"] else 0
        found[label] = Evidence(label, info.class_thresholds[label], tp, detections, int(s["gt"]))
    return found


def evidence_from_curves(calibration, thresholds: dict[str, float]) -> dict[str, Evidence]:
    """Per-label evidence at the thresholds used, from curves measured on validation images."""
    found = {}
    for label, curve in calibration.per_class.items():
        t = thresholds[label]
        kept = np.flatnonzero(curve.thresholds >= t)
        if not len(kept):
            found[label] = Evidence(label, t, 0, 0, curve.gt)
            continue
        i = int(kept[-1])
        tp = round(float(curve.recall[i]) * curve.gt)
        detections = round(tp / float(curve.precision[i])) if curve.precision[i] > 0 else 0
        found[label] = Evidence(label, t, tp, detections, curve.gt)
    return found


def count_annotations(images: Iterable) -> list[ImageCount]:
    """ImageRecords -> counts; the sample of an image is its CVAT task, else its subset."""
    out = []
    for im in images:
        sample = f"task {im.task_id}" if im.task_id is not None else im.subset
        out.append(ImageCount(im.identity, sample, Counter(split_unvalidated(s.label) for s in im.shapes)))
    return out


def count_detections(
    detector, items: list, read, describe, threshold: float | None, *, progress: bool = True
) -> tuple[list[ImageCount], list[str]]:
    """Run the model over ``items`` (``read(item)`` gives the frame, ``describe(item)`` its
    (image, sample) names); returns the counts and the reasons frames were skipped."""
    from tqdm import tqdm

    from trainer.inference import detect_each

    counts, failed = [], []
    detected = detect_each(detector, items, read, threshold)
    for item, image, det in tqdm(detected, total=len(items), unit="img", disable=not progress):
        if det is None:
            failed.append(str(image))
            continue
        name, sample = describe(item)
        drawn = det.drawable()
        counts.append(ImageCount(name, sample, Counter((det.labels[i], True) for i in drawn)))
    return counts, failed


def plot_counts(rows: list[dict], labels: list[str], out_png, title: str) -> None:
    """Grouped bars per sample and label: validated (solid) and not validated (light) stacked; for
    model counts the corrected estimate as a dot with its 95 % interval."""
    import io

    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from serverless.bundle import atomic_write

    samples = list(dict.fromkeys(r["sample"] for r in rows))
    by_key = {(r["sample"], r["label"]): r for r in rows}
    width = 0.8 / max(len(labels), 1)
    fig = Figure(figsize=(max(6.0, 0.5 + len(samples) * len(labels) * 0.35), 4.5), dpi=100,
                 layout="constrained")  # fmt: skip
    ax = fig.add_subplot()
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    for k, label in enumerate(labels):
        x = np.arange(len(samples)) + (k - (len(labels) - 1) / 2) * width
        got = [by_key.get((s, label), {}) for s in samples]
        ok = np.array([r.get("validated", 0) for r in got], dtype=float)
        nv = np.array([r.get("not_validated", 0) for r in got], dtype=float)
        colour = cmap(k % cmap.N)
        ax.bar(x, ok, width, color=colour, label=label)
        if nv.any():
            ax.bar(x, nv, width, bottom=ok, color=colour, alpha=0.35, hatch="//",
                   label=f"{label} (not validated)")  # fmt: skip
        est = [(xi, r) for xi, r in zip(x, got, strict=True) if r.get("corrected", "") != ""]
        if est:
            xs = [xi for xi, _ in est]
            mid = np.array([r["corrected"] for _, r in est], dtype=float)
            err = np.array([[m - r["low"], r["high"] - m] for m, (_, r) in zip(mid, est, strict=True)]).T
            ax.errorbar(xs, mid, yerr=np.maximum(err, 0), fmt="o", color="black", ms=3, capsize=2,
                        label="corrected (95 % interval)" if k == 0 else None)  # fmt: skip
    ax.set_xticks(np.arange(len(samples)), samples, rotation=45 if len(samples) > 6 else 0, ha="right")
    ax.set_ylabel("objects")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(out_png, lambda f: f.write(buffer.getvalue()))
