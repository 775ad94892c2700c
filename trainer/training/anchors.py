"""Object sizes, the input scale and the anchors, fitted to the training boxes.

torchvision's detectors carry priors made for COCO: anchors of 32 to 512 px (SSDlite: default boxes
from 64 px at its 320 px input). A particle of 10 px after the resize has no anchor near its size,
is matched only as a "low-quality" fallback and is hardly ever proposed. So before training we look at
the training boxes as the network will see them (after the model's own resize) and

- report per label the shorter side (in the source and after the resize) and the aspect ratio
  (height / width): min / median / 95th percentile;
- pick the input scale (``--image-size auto``): the frames' own size (or the architecture's default
  when that is smaller: large frames are shrunk as before), enlarged until the small end of every
  label (its 5th percentile) reaches twice the detectable size below, within caps that keep large
  frames affordable (at most 4x the source frame and 2x the architecture's default size);
- fit the anchors (``--anchors auto``): sizes spaced on a log scale from the small end of the observed
  range (2nd percentile, never below the finest feature stride, so that anchors still tile the image)
  over the range up to the 98th percentile, with the spacing between feature levels at least
  torchvision's; aspect ratios at the medians of the observed ratios' thirds. The number of anchors
  per location stays the architecture's, so every pretrained head weight still loads;
- warn about objects that stay below what the architecture detects well.

"Detected well" means a shorter side after the resize of at least ``max(8 px, finest feature
stride / 2, smallest anchor / 2)``: below 8 px few pixels carry an object; below half the stride it
covers less than half a cell of the finest feature map; below half the smallest anchor its best
anchor overlaps it by IoU < 0.25.

Torch-free, so that ``inspect`` reports the same figures without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serverless.architectures import Architecture, get_architecture
from serverless.errors import UserError

if TYPE_CHECKING:
    from trainer.data.records import ImageRecord

AUTO = "auto"
DEFAULT = "default"
FLOOR_PX = 8.0  # below this, few pixels carry an object whatever the network
SMALL_END = 5  # percentile of a label's shorter sides that auto scaling lifts
RANGE = (2, 98)  # percentiles of the object sizes the fitted anchors span
MAX_UPSCALE = 4.0  # auto never enlarges the median frame more than this
SIZE_CAP = 2.0  # ... nor beyond this multiple of the architecture's default size (4x its pixels)
SIZE_STEP = 32  # auto sizes are multiples of this (the coarsest FPN stride of most backbones)


@dataclass
class Boxes:
    """Every training box with its label and the size of its image, in source pixels."""

    labels: np.ndarray  # (N,) label names
    wh: np.ndarray  # (N, 2) width, height
    frame: np.ndarray  # (N, 2) width, height of the box's image
    frames: np.ndarray  # (M, 2) width, height of every image, with or without boxes

    @classmethod
    def of(cls, records: Sequence[ImageRecord]) -> Boxes:
        shapes = [(s, r) for r in records for s in r.shapes]
        wh = np.array([(s.box[2] - s.box[0], s.box[3] - s.box[1]) for s, _ in shapes], float)
        frame = np.array([(r.width, r.height) for _, r in shapes], float)
        frames = np.array([(r.width, r.height) for r in records], float)
        return cls(np.array([s.label for s, _ in shapes], object), wh.reshape(-1, 2),
                   frame.reshape(-1, 2), frames.reshape(-1, 2))


def resize_factors(spec: Architecture, min_size: int, max_size: int, frame: np.ndarray) -> np.ndarray:
    """(N, 2) x and y factors of the model's resize of frames (N, 2): torchvision's
    GeneralizedRCNNTransform takes min(min_size / short side, max_size / long side); fixed-size
    architectures (SSDlite) stretch every frame to a min_size square."""
    w, h = frame[:, 0], frame[:, 1]
    if spec.fixed_size:
        return np.stack([min_size / w, min_size / h], axis=1)
    scale = np.minimum(min_size / np.minimum(w, h), max_size / np.maximum(w, h))
    return np.stack([scale, scale], axis=1)


def default_max_size(spec: Architecture, image_size: int) -> int:
    """The longer-side cap that keeps the architecture's ratio of caps (1333 / 800) at any size."""
    return max(spec.max_size, round(image_size * spec.max_size / spec.min_size))


def describe(values: np.ndarray) -> dict[str, float]:
    """min / median / 95th percentile (numpy's linear interpolation), rounded to 0.01."""
    low, median, p95 = np.percentile(values, [0, 50, 95])
    return {"min": round(float(low), 2), "median": round(float(median), 2), "p95": round(float(p95), 2)}


def smallest_anchor(spec: Architecture, anchors: dict | None, image_size: int) -> float:
    """Side of the smallest prior (square root of its area) in resized pixels; 0 without priors."""
    anchors = anchors if anchors is not None else spec.priors.default_anchors()
    if anchors is None:
        return 0.0
    if "scales" in anchors:
        return float(min(anchors["scales"])) * image_size
    return float(min(min(level) for level in anchors["sizes"]))


def detectable_px(spec: Architecture, smallest: float) -> float:
    """The shorter side, after the resize, from which the architecture detects objects well."""
    return max(FLOOR_PX, spec.priors.strides[0] / 2, smallest / 2)


def auto_image_size(spec: Architecture, boxes: Boxes, max_size: int | None, anchors: str) -> int:
    """The smallest size on the SIZE_STEP grid, from the frames' own (or the architecture's default
    when that is smaller) up to the caps, at which every label's small end reaches twice the
    detectable size."""
    if not len(boxes.wh):
        return spec.min_size
    frame_short = float(np.median(boxes.frames.min(axis=1)))
    floor = min(spec.min_size, -(-round(frame_short) // SIZE_STEP) * SIZE_STEP)
    cap = max(floor, min(round(SIZE_CAP * spec.min_size), _step_down(MAX_UPSCALE * frame_short)))
    for size in [*range(floor, cap, SIZE_STEP), cap]:
        factors = resize_factors(spec, size, max_size or default_max_size(spec, size), boxes.frame)
        if small_end(boxes, factors) >= 2 * detectable_px(spec, _smallest_at(spec, anchors, size)):
            return size
    return cap


def _smallest_at(spec: Architecture, anchors: str, size: int) -> float:
    """The smallest anchor at input ``size`` for an --anchors choice; fitted ones start at the
    finest stride when objects are small."""
    if anchors == AUTO:
        return float(spec.priors.strides[0])
    if anchors == DEFAULT or spec.priors.layout == "none":
        return smallest_anchor(spec, None, size)
    return smallest_anchor(spec, given_anchors(spec, anchors, size), size)


def small_end(boxes: Boxes, factors: np.ndarray) -> float:
    """The smallest of the labels' 5th percentiles of the shorter side after the resize."""
    short = (boxes.wh * factors).min(axis=1)
    return min(float(np.percentile(short[boxes.labels == name], SMALL_END)) for name in set(boxes.labels))


def _step_down(value: float) -> int:
    return max(SIZE_STEP, int(value // SIZE_STEP) * SIZE_STEP)


# ---------------------------------------------------------------- anchors


def fit_anchors(spec: Architecture, wh: np.ndarray, image_size: int) -> dict[str, list] | None:
    """Priors for boxes ``wh`` (resized pixels), laid out as the architecture's defaults are."""
    priors = spec.priors
    if priors.layout == "none" or not len(wh):
        return None
    sizes = np.sqrt(wh[:, 0] * wh[:, 1])
    low, high = np.percentile(sizes, RANGE)
    start = max(float(low), float(priors.strides[0]))
    ratios = np.log(wh[:, 1] / wh[:, 0])
    if priors.layout == "ssd":
        maps = len(priors.aspect_ratios)
        # a default box beyond the square is clipped to it anyway
        scales = [min(1.0, round(v / image_size, 4)) for v in _geometric(start, high, maps + 1, 2.0)]
        spread = [round(float(np.exp(np.percentile(np.abs(ratios), q))), 2) for q in (50, 90)]
        return {"scales": scales, "aspect_ratios": [spread] * maps}
    thirds = [round(float(np.exp(np.percentile(ratios, q))), 2) for q in (100 / 6, 50, 500 / 6)]
    levels, per_level = len(priors.sizes), len(priors.sizes[0])
    if priors.layout == "shared":
        return {"sizes": [_geometric(start, high, per_level, math.sqrt(2))] * levels,
                "aspect_ratios": [thirds] * levels}
    chain = _geometric(start, high, levels * per_level, 2 ** (1 / per_level))
    return {"sizes": [chain[i * per_level:(i + 1) * per_level] for i in range(levels)],
            "aspect_ratios": [thirds] * levels}


def _geometric(start: float, high: float, count: int, min_step: float) -> list[float]:
    """``count`` sizes from ``start`` reaching ``high``, consecutive ones at least ``min_step`` apart."""
    step = max(min_step, float(high / start) ** (1 / (count - 1)) if high > start else min_step)
    return [round(float(start * step**i), 1) for i in range(count)]


def given_anchors(spec: Architecture, text: str, image_size: int) -> dict[str, list]:
    """``--anchors 16,32,64,128,256``: one size per level (MobileNet R-CNN: the sizes of every
    level), with the architecture's aspect ratios and per-level octaves."""
    priors, sizes = spec.priors, [float(v) for v in text.split(",")]
    default = priors.default_anchors()
    if default is None:
        raise UserError(f"--anchors {text}: {spec.name} takes no sizes (it has no anchors); auto or default")
    expected = {"levels": len(priors.sizes), "shared": len(priors.sizes[0]), "ssd": len(priors.aspect_ratios)}
    if len(sizes) != expected[priors.layout]:
        count = expected[priors.layout]
        raise UserError(f"--anchors {text}: {spec.name} takes {count} sizes, one per feature level; "
                        "or use auto or default")
    if priors.layout == "ssd":
        scales = [*sizes, sizes[-1] ** 2 / sizes[-2]] if len(sizes) > 1 else [*sizes, sizes[0]]
        return {"scales": [round(v / image_size, 4) for v in scales], **_ratios(default)}
    if priors.layout == "shared":
        return {"sizes": [sizes] * len(priors.sizes), **_ratios(default)}
    per = len(priors.sizes[0])
    return {"sizes": [[round(s * 2 ** (j / per), 1) for j in range(per)] for s in sizes], **_ratios(default)}


def _ratios(default: dict) -> dict[str, list]:
    return {"aspect_ratios": default["aspect_ratios"]}


def describe_anchors(anchors: dict | None, image_size: int) -> str:
    """"16-256 px, aspect ratios 0.8/1/1.25" (the first level's ratios)."""
    if anchors is None:
        return "none"
    if "scales" in anchors:
        sizes = [s * image_size for s in anchors["scales"][:-1]]
    else:
        sizes = [s for level in anchors["sizes"] for s in level]
    ratios = "/".join(f"{r:g}" for r in anchors["aspect_ratios"][0])
    return f"{min(sizes):.0f}-{max(sizes):.0f} px, aspect ratios {ratios}"


# ---------------------------------------------------------------- the choice


@dataclass
class Sizing:
    """The input scale and priors a run trains and serves with, why, and what objects look like."""

    architecture: str
    image_size: int  # shorter side the model resizes to (fixed-size models: the square's side)
    max_size: int
    anchors: dict[str, list] | None  # None: the architecture's defaults
    how: dict[str, str]  # {"image_size": ..., "anchors": ...}: auto, given, inherited, defaults
    detectable_px: float  # shorter side after the resize from which objects are detected well
    scale: tuple[float, float]  # smallest and largest resize factor over the images
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # per label, see label_sizes
    warnings: list[str] = field(default_factory=list)

    def recorded(self) -> dict[str, Any]:
        """What a checkpoint keeps so that --resume rebuilds exactly this model."""
        return {"image_size": self.image_size, "max_size": self.max_size, "anchors": self.anchors}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(
    spec: Architecture,
    records: Sequence[ImageRecord],
    labels: Sequence[str],
    *,
    image_size: int | str = AUTO,
    max_size: int | None = None,
    anchors: str = AUTO,
    inherited: dict[str, Any] | None = None,
    source: str = "",
) -> Sizing:
    """Resolve --image-size and --anchors against the training ``records``.

    ``inherited`` (a parent run's or a checkpoint's :meth:`Sizing.recorded`) replaces what would
    be chosen automatically: a retrained model keeps the scale and anchors its weights learnt.
    """
    boxes = Boxes.of(records)
    how: dict[str, str] = {}
    if image_size != AUTO:
        size, how["image_size"] = int(image_size), "given"
    elif inherited:
        size, how["image_size"] = int(inherited["image_size"]), f"from {source}"
    else:
        size = auto_image_size(spec, boxes, max_size, anchors)
        how["image_size"] = "auto"
    if max_size is None and inherited and image_size == AUTO:
        max_size = inherited["max_size"]
    max_size = max_size or default_max_size(spec, size)
    factors = resize_factors(spec, size, max_size, boxes.frame)
    fitted, how["anchors"] = _anchors(spec, boxes.wh * factors, size, anchors, inherited, source)
    floor = detectable_px(spec, smallest_anchor(spec, fitted, size))
    sizing = Sizing(spec.name, size, max_size, fitted, how, floor, _scale_range(spec, size, max_size, boxes),
                    label_sizes(boxes, labels, factors, floor))
    sizing.warnings = _warnings(sizing, spec)
    return sizing


def _anchors(spec: Architecture, wh: np.ndarray, size: int, anchors: str, inherited: dict | None,
             source: str) -> tuple[dict | None, str]:
    if anchors == DEFAULT:
        return None, "torchvision's defaults"
    if anchors != AUTO:
        return given_anchors(spec, anchors, size), "given"
    if inherited:
        return inherited["anchors"], f"from {source}"
    if spec.priors.layout == "none":
        return None, f"{spec.name} has none to fit (one location per cell, sized by its stride)"
    fitted = fit_anchors(spec, wh, size)
    return fitted, "fitted to the training boxes" if fitted else "torchvision's defaults (no boxes)"


def _scale_range(spec: Architecture, size: int, max_size: int, boxes: Boxes) -> tuple[float, float]:
    if not len(boxes.frames):
        return (1.0, 1.0)
    factors = resize_factors(spec, size, max_size, boxes.frames)
    return (round(float(factors.min()), 3), round(float(factors.max()), 3))


def label_sizes(
    boxes: Boxes, labels: Sequence[str], factors: np.ndarray, floor: float
) -> dict[str, dict[str, Any]]:
    """Per label: objects, shorter side in the source and after the resize, aspect ratio (h / w
    as the model sees it), each as min / median / p95, and how many objects are below ``floor``
    after the resize."""
    resized = boxes.wh * factors
    out: dict[str, dict[str, Any]] = {}
    for name in labels:
        chosen = boxes.labels == name
        if not chosen.any():
            out[name] = {"objects": 0}
            continue
        out[name] = {
            "objects": int(chosen.sum()),
            "short_side": describe(boxes.wh[chosen].min(axis=1)),
            "short_side_resized": describe(resized[chosen].min(axis=1)),
            "aspect_ratio": describe(resized[chosen, 1] / resized[chosen, 0]),
            "below_detectable": int((resized[chosen].min(axis=1) < floor).sum()),
        }
    return out


def _warnings(sizing: Sizing, spec: Architecture) -> list[str]:
    """One line per label with objects below the detectable size, then the rule once."""
    lines = [
        f"{name}: {row['below_detectable']} of {row['objects']} objects are smaller than "
        f"{sizing.detectable_px:.0f} px after the resize, less than {spec.name} detects well"
        for name, row in sizing.objects.items() if row.get("below_detectable")
    ]
    if lines:
        stride = spec.priors.strides[0]
        anchor = smallest_anchor(spec, sizing.anchors, sizing.image_size)
        lines.append(f"the rule: shorter side >= max(8 px, finest feature stride {stride} px / 2, smallest "
                     f"anchor {anchor:.0f} px / 2); --image-size auto or a larger --image-size enlarges them")
    return lines


# ---------------------------------------------------------------- what the user reads


def format_sizing(sizing: Sizing, with_input: bool = True) -> str:
    """The per-label size table, the chosen input scale and anchors, and the warnings."""
    low, high = sizing.scale
    factor = f"x{low:.2f}" if low == high else f"x{low:.2f}-{high:.2f}"
    rows = [("label", "objects", "source", f"resized {factor}", "aspect h/w")]
    for name, row in sizing.objects.items():
        if not row["objects"]:
            rows.append((name, "0", "", "", ""))
            continue
        rows.append((name, str(row["objects"]), _triple(row["short_side"], "{:.0f}"),
                     _triple(row["short_side_resized"], "{:.0f}"), _triple(row["aspect_ratio"], "{:.2f}")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"object sizes in the training images as {sizing.architecture} sees them: shorter side in px "
             "and aspect ratio, min / median / p95"]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    if with_input:
        lines.append("input: " + describe_input(sizing))
    lines += [f"warning: {w}" for w in sizing.warnings]
    return "\n".join(lines)


def describe_input(sizing: Sizing) -> str:
    """"shorter side 800 (auto), longer side at most 1333, anchors 16-256 px, ... (fitted ...)"."""
    n, how = sizing.image_size, sizing.how["image_size"]
    size = f"shorter side {n} ({how}), longer side at most {sizing.max_size}"
    if get_architecture(sizing.architecture).fixed_size:
        size = f"{n} x {n} square input ({how})"
    anchors = describe_anchors(sizing.anchors, sizing.image_size) if sizing.anchors else "the architecture's"
    return f"{size}, anchors {anchors} ({sizing.how['anchors']})"


def _triple(stats: dict[str, float], fmt: str) -> str:
    return " / ".join(fmt.format(stats[k]) for k in ("min", "median", "p95"))
