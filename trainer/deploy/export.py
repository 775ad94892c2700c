"""Export a bundle's network for the CPU engine (:mod:`serverless.engine`), verified against PyTorch.

The whole torchvision model is traced by the TorchScript-based ONNX exporter (opset 17, dynamic
frame size; the dynamo exporter cannot export the R-CNNs' data-dependent NMS and RoIAlign) and
converted to OpenVINO IR with float32 weights. Three things are changed while tracing, none of them
what the model computes:

- the resize takes its output size from the graph's ``size`` input, computed at serving time in
  float64 as eager torchvision does; traced, torchvision computes it in float32 and is one pixel off
  on about one frame size in six (4000x3000 resizes to 1066x799), and OpenVINO computes float64
  graph arithmetic wrongly, so it cannot be fixed inside the graph;
- MultiScaleRoIAlign's per-level results are put back in RoI order with one gather instead of
  torchvision's tracing path (a zero tensor scattered into once per level), which took about a
  seventh of the MobileNet model's time in OpenVINO;
- mask models return each detection's 28x28 mask probabilities instead of N full-frame masks; the
  engine pastes them as torchvision does (:func:`serverless.engine.paste_mask`);
- the box decoder shapes its result without a Python branch on the number of boxes: traced, that
  branch was fixed by the example frame, and an example without proposals (a trained model can have
  none on a frame) made a graph that fails on every frame with some.

The export is then run next to PyTorch on verification frames and kept only when it finds the same
detections (:func:`compare`); otherwise :class:`EngineUnfaithful` says why and the caller serves the
bundle with PyTorch. Files are written so that engine.json, written last, always describes the
engine.xml/engine.bin beside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import _utils, transform
from torchvision.ops import poolers

from serverless.bundle import (
    ENGINE_BIN,
    ENGINE_JSON,
    ENGINE_XML,
    WEIGHTS,
    BundleError,
    BundleInfo,
    atomic_write,
    load_model,
)
from serverless.detections import Detections
from serverless.engine import (
    INPUTS,
    OUTPUTS,
    EngineInfo,
    OpenVinoNetwork,
    cpu_computes_bf16,
    cpu_threads,
    load_engine_info,
    open_detector,
    paste_mask,
    resized_size,
    weights_digest,
)
from serverless.errors import UserError
from serverless.tiling import inclusive_box

ONNX_OPSET = 17


@dataclass(frozen=True)
class Tolerance:
    """When an engine's detection is PyTorch's: same label, boxes within ``box_px`` on every side or
    overlapping at least ``min_iou``, scores within ``score``; detections within ``floor_margin`` below
    their class's floor take part, so that a score just across it on one side is not a miss."""

    box_px: float
    min_iou: float
    score: float
    floor_margin: float


#: f32: the same detections (float32 sums in another order move scores by about 1e-6).
SAME = Tolerance(box_px=1.0, min_iou=0.99, score=1e-3, floor_margin=1e-3)
#: bf16, an opt-in: the same detections at the thresholds, none across them, each near PyTorch's
#: (bf16 keeps 8 bits of mantissa: scores move by up to about 0.05 and boxes by 1-2 px).
BF16 = Tolerance(box_px=4.0, min_iou=0.9, score=0.1, floor_margin=0.0)
#: Masks (binarised) overlapping at least this are the same.
MASK_MIN_IOU = 0.95
#: Verification compares every detection at or above the bundle's threshold of its class, capped here,
#: so that a CVAT user lowering the threshold to a usual value still gets verified detections.
VERIFY_THRESHOLD_CAP = 0.5
#: How many times faster than f32 bf16x3 must run at packaging to be chosen: a tie is not a gain, and
#: timing noise must not pick the arithmetic that depends on more of the CPU plugin.
BF16X3_GAIN = 1.1
#: Generated verification frames (width, height) when no frames are given: 4:3, wide, portrait, and a
#: size at which float32 resize arithmetic is a pixel off.
GENERATED_SIZES = ((640, 480), (1280, 720), (600, 1000), (1001, 333))
#: Frames taken from a folder for verification, at most (each runs through PyTorch and the engine).
FOLDER_FRAMES = 8

Frame = tuple[str, np.ndarray]  # a name for messages, and an HxWx3 uint8 RGB image


class EngineUnfaithful(UserError):
    """The export does not reproduce PyTorch (or cannot be made): the bundle is served by PyTorch."""


@dataclass
class Agreement:
    """How an engine's detections compare with PyTorch's on some frames, at the verification floors."""

    frames: int = 0
    reference: int = 0  # PyTorch detections at or above the floors
    missing: int = 0  # of those, not found by the engine
    extra: int = 0  # engine detections at or above the floors that PyTorch does not have
    worst_box_px: float = 0.0
    worst_iou: float = 1.0
    worst_score: float = 0.0
    worst_mask_iou: float = 1.0

    @property
    def same(self) -> bool:
        return self.missing == 0 and self.extra == 0 and self.worst_mask_iou >= MASK_MIN_IOU

    def add(self, other: Agreement) -> None:
        self.frames += other.frames
        self.reference += other.reference
        self.missing += other.missing
        self.extra += other.extra
        self.worst_box_px = max(self.worst_box_px, other.worst_box_px)
        self.worst_iou = min(self.worst_iou, other.worst_iou)
        self.worst_score = max(self.worst_score, other.worst_score)
        self.worst_mask_iou = min(self.worst_mask_iou, other.worst_mask_iou)

    def summary(self) -> str:
        text = (
            f"{self.reference} detections on {self.frames} frames: "
            f"{self.missing} missing, {self.extra} extra; "
            f"boxes within {self.worst_box_px:.3f} px (IoU >= {self.worst_iou:.4f}), "
            f"scores within {self.worst_score:.1e}"
        )
        return text + (f", masks IoU >= {self.worst_mask_iou:.3f}" if self.worst_mask_iou < 1 else "")


def ensure_engine(bundle_dir: str | Path, frames: Sequence[Frame] | None = None) -> EngineInfo:
    """The bundle's verified engine: the one beside the weights when it was exported from them with
    this format version, else a new export verified on ``frames`` (when None: the run's validation
    images if its data is readable here, else generated frames)."""
    try:
        return load_engine_info(bundle_dir)
    except BundleError:
        pass
    if frames is None:
        frames = validation_frames(bundle_dir) or generated_frames()
    return export_engine(bundle_dir, frames)


def verify_bf16(bundle_dir: str | Path, frames: Sequence[Frame] | None = None) -> Agreement:
    """The bundle's verified engine computing in bf16 against PyTorch fp32, by :data:`BF16`, on
    ``frames`` (None: as :func:`ensure_engine`), recorded in engine.json under ``verification.bf16``:
    serving in bf16 needs it to say ``same``. On a CPU without AMX or AVX512-BF16, OpenVINO computes
    in f32 whatever it is asked (``computes_in`` records which)."""
    computes_in = {"computes_in": "bf16" if cpu_computes_bf16() else "f32"}
    return Agreement(**_check_precision(bundle_dir, "bf16", BF16, frames, extra=computes_in)["agreement"])


def verify_bf16x3(bundle_dir: str | Path, frames: Sequence[Frame] | None = None) -> dict[str, Any]:
    """The bundle's verified engine computing its large convolutions in bf16x3
    (:mod:`serverless.bf16x3`) against PyTorch fp32, by :data:`SAME`, and timed against the f32
    engine on the first frame; recorded in engine.json under ``verification.bf16x3``. ``chosen``:
    the same detections, no layer leaked to bf16, and :data:`BF16X3_GAIN` times faster, so that an
    ``auto`` function computes in it on CPUs with AMX."""
    return _check_precision(bundle_dir, "bf16x3", SAME, frames, timed=True)


def _check_precision(
    bundle_dir: str | Path, precision: str, tolerance: Tolerance, frames: Sequence[Frame] | None,
    timed: bool = False, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the engine in ``precision`` against PyTorch on ``frames`` and record it in engine.json
    (with ``extra``; ``timed``: its speed against f32, and whether it is ``chosen``)."""
    bundle_dir = Path(bundle_dir)
    if frames is None:
        frames = validation_frames(bundle_dir) or generated_frames()
    engine = ensure_engine(bundle_dir, frames)
    info, model = load_model(bundle_dir, "cpu")
    network = OpenVinoNetwork(bundle_dir / ENGINE_XML, cpu_threads(), precision)
    floors = _verified_floors(info)
    agreement = verify(model, network, engine, frames, floors, tolerance)
    record: dict[str, Any] = {"frames": [name for name, _ in frames], **(extra or {}),
                              "agreement": asdict(agreement), "same": agreement.same}  # fmt: skip
    if timed:
        frame = frames[0][1]
        size = resized_size(*frame.shape[:2], engine)
        f32 = OpenVinoNetwork(bundle_dir / ENGINE_XML, network.threads)
        record["ms"] = {"f32": _best_ms(f32, frame, size), precision: _best_ms(network, frame, size)}
        faithful = agreement.same and network.precision == precision  # not fallen back to f32
        record["chosen"] = faithful and record["ms"]["f32"] >= BF16X3_GAIN * record["ms"][precision]
    engine.verification[precision] = record
    atomic_write(bundle_dir / ENGINE_JSON, lambda f: f.write(engine.to_json().encode()))
    return record


def _best_ms(network: OpenVinoNetwork, frame: np.ndarray, size: tuple[int, int], runs: int = 3) -> float:
    """The faster of ``runs`` warm inferences of one frame, in ms."""
    network(frame, size)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        network(frame, size)
        times.append((time.perf_counter() - start) * 1000)
    return round(min(times), 1)


def detector_for(
    run: str | Path, device: str = "auto", engine: str = "pytorch", frames: Sequence[Frame] | None = None
) -> Any:
    """The detector a command runs the model with: for ``openvino``, the run's verified export (made
    on first use, verified on ``frames``); when it differs from PyTorch, PyTorch on the CPU with a
    note on stderr saying why."""
    if engine == "openvino":
        if device not in ("auto", "cpu"):
            raise UserError(f"--engine openvino runs on the CPU; got --device {device}")
        try:
            ensure_engine(run, frames)
        except EngineUnfaithful as exc:
            print(f"note: {exc}; running PyTorch on the CPU instead", file=sys.stderr)
            return open_detector(run, "cpu", "pytorch")
    return open_detector(run, device, engine)


def export_engine(bundle_dir: str | Path, frames: Sequence[Frame], threads: int | None = None) -> EngineInfo:
    """Export, verify on ``frames`` and store the engine beside the bundle's weights."""
    import openvino as ov

    bundle_dir = Path(bundle_dir)
    if not frames:
        raise UserError("engine verification needs at least one frame")
    info, model = load_model(bundle_dir, "cpu")
    resize = model.transform
    engine = EngineInfo(
        weights_sha256=weights_digest(bundle_dir / WEIGHTS),
        min_size=int(resize.min_size[-1]),
        max_size=int(resize.max_size),
        fixed_size=resize.fixed_size is not None,
        masks=info.shape_type == "mask",
        exported_with={"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "openvino": ov.__version__},
    )  # fmt: skip
    if engine.fixed_size:
        engine.min_size = engine.max_size = int(resize.fixed_size[0])
    floors = _verified_floors(info)
    with tempfile.TemporaryDirectory(prefix=".engine.", dir=bundle_dir) as tmp:
        xml = Path(tmp) / ENGINE_XML
        try:
            _to_onnx(model, Path(tmp) / "model.onnx", frames[0][1], engine)
            ov.save_model(ov.convert_model(Path(tmp) / "model.onnx"), xml, compress_to_fp16=False)
        except Exception as exc:  # the exporters fail in many types
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise EngineUnfaithful(f"{info.architecture}: the export failed ({problem})") from exc
        network = OpenVinoNetwork(xml, threads or cpu_threads())
        try:
            agreement = verify(model, network, engine, frames, floors)
        except RuntimeError as exc:  # OpenVINO's errors
            problem = str(exc).strip().splitlines()[-1]
            raise EngineUnfaithful(f"{info.architecture}: the OpenVINO export fails ({problem})") from exc
        engine.verification = {
            "frames": [name for name, _ in frames],
            "thresholds": {label: round(float(t), 4) for label, t in zip(info.labels, floors, strict=True)},
            "precision": network.precision,
            "agreement": asdict(agreement),
        }
        if not agreement.same:
            raise EngineUnfaithful(
                f"{info.architecture}: the OpenVINO export differs from PyTorch: {agreement.summary()}"
            )
        _install(Path(tmp), bundle_dir, engine)
    return engine


def _verified_floors(info: BundleInfo) -> np.ndarray:
    """The per-class scores down to which verification compares detections: the bundle's
    thresholds, capped at :data:`VERIFY_THRESHOLD_CAP`."""
    return np.minimum(info.score_floors(), VERIFY_THRESHOLD_CAP)


def verify(
    model: Any, network: OpenVinoNetwork, engine: EngineInfo, frames: Sequence[Frame], floors: np.ndarray,
    tolerance: Tolerance = SAME,
) -> Agreement:
    """PyTorch ``model`` and the engine ``network`` on each frame, compared by :func:`compare`."""
    total = Agreement()
    for _name, frame in frames:
        tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
        with torch.inference_mode():
            ref = {k: v.numpy() for k, v in model([tensor])[0].items()}
        got = dict(zip(OUTPUTS, network(frame, resized_size(*frame.shape[:2], engine)), strict=False))
        total.add(compare(ref, got, floors, tolerance))
    return total


def as_outputs(found: Detections, labels: list[str]) -> dict[str, np.ndarray]:
    """A detector's :class:`Detections` as :func:`compare` reads model outputs: class numbers (1 for
    ``labels[0]``) instead of names."""
    classes = np.array([labels.index(name) + 1 for name in found.labels], dtype=np.int64)
    return {"boxes": found.boxes, "scores": found.scores, "labels": classes}


def compare(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], floors: np.ndarray, tolerance: Tolerance = SAME
) -> Agreement:
    """Match one frame's detections (``boxes``, ``scores``, ``labels``, and for masks ``masks``: full
    frame probabilities in ``ref``, 28x28 in ``got``), PyTorch's ``ref`` against an engine's ``got``.

    With :data:`SAME`, detections within 1e-3 of the floor of their class take part, so that 0.4996
    against 0.5003 at a floor of 0.5 is a match, not a missing and an extra. A pair matches when it
    is one by ``tolerance``; greedy, PyTorch's highest score first, best IoU first."""
    keep_ref, keep_got = (_near_floor(d, floors, tolerance.floor_margin) for d in (ref, got))
    rb, gb = ref["boxes"][keep_ref], got["boxes"][keep_got]
    rs, gs = ref["scores"][keep_ref], got["scores"][keep_got]
    rl, gl = ref["labels"][keep_ref], got["labels"][keep_got]
    iou = _iou(rb, gb)
    close = np.abs(rb[:, None] - gb[None]).max(-1, initial=0) <= tolerance.box_px
    same_score = np.abs(rs[:, None] - gs[None]) <= tolerance.score
    ok = (rl[:, None] == gl[None]) & same_score & (close | (iou >= tolerance.min_iou))
    used = np.zeros(len(gb), dtype=bool)
    pairs = []
    for i in np.argsort(-rs, kind="stable"):
        candidates = np.flatnonzero(ok[i] & ~used)
        if len(candidates):
            j = candidates[np.argmax(iou[i, candidates])]
            used[j] = True
            pairs.append((i, j))
    matched_ref = np.zeros(len(rb), dtype=bool)
    matched_ref[[i for i, _ in pairs]] = True
    above_ref, above_got = rs >= _floor(rl, floors), gs >= _floor(gl, floors)
    missing, extra = int((above_ref & ~matched_ref).sum()), int((above_got & ~used).sum())
    result = Agreement(frames=1, reference=int(above_ref.sum()), missing=missing, extra=extra)
    for i, j in pairs:
        result.worst_box_px = max(result.worst_box_px, float(np.abs(rb[i] - gb[j]).max()))
        result.worst_iou = min(result.worst_iou, float(iou[i, j]))
        result.worst_score = max(result.worst_score, float(abs(rs[i] - gs[j])))
    if "masks" in ref:
        index_ref, index_got = np.flatnonzero(keep_ref), np.flatnonzero(keep_got)
        for i, j in pairs:
            mask_iou = _mask_iou(ref, got, index_ref[i], index_got[j])
            result.worst_mask_iou = min(result.worst_mask_iou, mask_iou)
    return result


def folder_frames(folder: str | Path, limit: int = FOLDER_FRAMES) -> list[Frame]:
    """Up to ``limit`` images of ``folder`` (sorted, searched recursively) as verification frames."""
    from serverless.imageio import read_image
    from trainer.inference import find_images

    paths = find_images(Path(folder))[:limit] if Path(folder).is_dir() else []
    if not paths:
        raise UserError(f"{folder}: no .jpg/.jpeg/.png/.tif/.tiff/.bmp images to verify the engine on")
    return [(str(path), read_image(path)) for path in paths]


def validation_frames(run: str | Path, limit: int = FOLDER_FRAMES) -> list[Frame]:
    """Up to ``limit`` of the images the run held out for validation: the data sources its
    model.json records (local exports; relative paths from the working directory) read again and
    split with its recorded split options. [] when they cannot be read here (moved, downloaded from a
    server, no images in the export): the caller verifies on other frames then."""
    from serverless.bundle import load_info
    from serverless.imageio import read_image
    from trainer.data.options import DataOptions, load_from_args
    from trainer.data.splits import SplitOptions, split_data

    provenance = load_info(run).provenance
    sources = provenance.get("data", {}).get("sources") or []
    if not sources or not all(Path(source).exists() for source in sources):
        return []
    try:
        data = load_from_args(DataOptions(data=list(sources)))
        options = SplitOptions.from_dict(provenance.get("split_options", {}))
        held_out = split_data(data, options, require_train=False)["val"]
        paths = [record.path for record in held_out if record.path is not None][:limit]
        return [(f"validation image {Path(path).name}", read_image(path)) for path in paths]
    except (UserError, OSError):
        return []


def generated_frames(sizes: Sequence[tuple[int, int]] = GENERATED_SIZES, seed: int = 0) -> list[Frame]:
    """Seeded frames with image-like statistics (smooth multi-scale texture, filled shapes, grain)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    frames = []
    for width, height in sizes:
        texture = np.zeros((height, width, 3), np.float32)
        for cells, weight in ((4, 0.5), (16, 0.25), (64, 0.12)):
            small = (rng.random((max(2, cells * height // width), cells, 3)) * 255).astype(np.uint8)
            smooth = Image.fromarray(small).resize((width, height), Image.BICUBIC)
            texture += weight * np.asarray(smooth, np.float32)
        image = Image.fromarray(np.clip(texture / 0.87, 0, 255).astype(np.uint8))
        draw, side = ImageDraw.Draw(image), min(width, height)
        for _ in range(30):
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(side // 40, side // 6))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x - r, y - r, x + r, y + r], fill=colour)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), np.int16)
        pixels = np.clip(pixels + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
        frames.append((f"generated {width}x{height}", pixels))
    return frames


# ---------------------------------------------------------------- tracing


class _Traced(torch.nn.Module):
    """(HxWx3 uint8 frame, int64[2] resized size) -> boxes, scores, labels[, masks] of one frame,
    the frame converted to float exactly as :class:`serverless.detector.Detector` does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.size: torch.Tensor | None = None  # read by the patched resize while tracing

    def forward(self, image: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.size = size
        output = self.model([image.permute(2, 0, 1).float().div(255.0)])[0]
        return tuple(output[k] for k in OUTPUTS if k in output)


def _to_onnx(model: torch.nn.Module, path: Path, example: np.ndarray, engine: EngineInfo) -> None:
    """Trace ``model`` for one HxWx3 uint8 frame and its resized size (see the module docstring)."""
    traced = _Traced(model).eval()  # the exporter restores the wrapper's mode afterwards
    example_size = torch.tensor(resized_size(*example.shape[:2], engine))
    outputs = list(OUTPUTS if engine.masks else OUTPUTS[:3])
    dynamic = {INPUTS[0]: {0: "height", 1: "width"}, **{name: {0: "detections"} for name in outputs}}
    with _tracing_patches(traced), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constants, and the exporter's deprecation
        torch.onnx.export(
            traced, (torch.from_numpy(np.ascontiguousarray(example)), example_size), str(path), dynamo=False,
            opset_version=ONNX_OPSET, input_names=list(INPUTS), output_names=outputs, dynamic_axes=dynamic,
        )  # fmt: skip


@contextlib.contextmanager
def _tracing_patches(traced: _Traced) -> Iterator[None]:
    """torchvision's resize, level merge and mask paste replaced while tracing (module docstring)."""

    def resize(image: torch.Tensor, *args: Any, target: Any = None, **kw: Any) -> tuple[torch.Tensor, Any]:
        size = traced.size
        resized = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)
        return resized[0], target

    def merge_levels(levels: torch.Tensor, unmerged: list[torch.Tensor]) -> torch.Tensor:
        order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged))])
        inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.size(0)))
        return torch.cat(unmerged).index_select(0, inverse)

    def keep_mask_probabilities(masks: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return masks

    def decode(coder: _utils.BoxCoder, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        concat = torch.cat(boxes, dim=0)  # rel_codes: one row of 4 * classes codes per box
        return coder.decode_single(rel_codes, concat).reshape(concat.size(0), rel_codes.size(1) // 4, 4)

    patches = [
        (transform, "_resize_image_and_masks", resize),
        (poolers, "_onnx_merge_levels", merge_levels),
        (transform, "paste_masks_in_image", keep_mask_probabilities),
        (_utils.BoxCoder, "decode", decode),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# ---------------------------------------------------------------- helpers


def _install(tmp: Path, bundle_dir: Path, engine: EngineInfo) -> None:
    """Move the verified export beside the weights: the old engine.json goes first and the new one
    comes last, so an engine.json never describes other files than those beside it."""
    (bundle_dir / ENGINE_JSON).unlink(missing_ok=True)
    for name in (ENGINE_XML, ENGINE_BIN):
        os.replace(tmp / name, bundle_dir / name)
    atomic_write(bundle_dir / ENGINE_JSON, lambda f: f.write(engine.to_json().encode()))


def _floor(labels: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Each detection's class floor; labels outside the bundle's classes get an unreachable one."""
    known = (labels >= 1) & (labels <= len(floors))
    return np.where(known, floors[np.clip(labels - 1, 0, len(floors) - 1)], np.inf)


def _near_floor(detections: dict[str, np.ndarray], floors: np.ndarray, margin: float) -> np.ndarray:
    return detections["scores"] >= _floor(detections["labels"], floors) - margin


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a, area_b = (np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1) for x in (a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_a[:, None] + area_b[None] - inter)
    return np.nan_to_num(iou, nan=0.0)


def _mask_iou(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], i: int, j: int) -> float:
    """IoU of the binarised masks of PyTorch's detection ``i`` and the engine's ``j``, each cut to
    its detection's inclusive box as the detectors serve them."""
    height, width = ref["masks"].shape[-2:]
    whole = (0, 0, width, height)
    x0, y0, x1, y1 = inclusive_box(ref["boxes"][i], whole)
    mine = np.zeros((height, width), dtype=bool)
    mine[y0 : y1 + 1, x0 : x1 + 1] = ref["masks"][i, 0, y0 : y1 + 1, x0 : x1 + 1] >= 0.5
    crop = inclusive_box(got["boxes"][j], whole)
    theirs = np.zeros((height, width), dtype=bool)
    pasted = paste_mask(got["masks"][j, 0], got["boxes"][j], crop, (height, width))
    theirs[crop[1] : crop[3] + 1, crop[0] : crop[2] + 1] = pasted
    union = (mine | theirs).sum()
    return float((mine & theirs).sum() / union) if union else 1.0
