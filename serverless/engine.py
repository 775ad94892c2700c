"""The CPU engine: a bundle's network exported to OpenVINO, served without torch.

``package --cpu`` (and ``predict``/``crop --engine openvino``) export the network once, verify that
it finds what PyTorch finds (:mod:`trainer.deploy.export`), and store it beside the weights:
``engine.xml``/``engine.bin`` (OpenVINO IR, float32 weights) and ``engine.json`` (:class:`EngineInfo`:
its format version, the sha256 of the weights it came from, the resize it expects, how it was
verified). :class:`EngineDetector` serves it with the same contract as
:class:`serverless.detector.Detector`: thresholds, tiling, merging (:mod:`serverless.tiling`) and
masks are the same code, and it imports only numpy and openvino.

The exported graph is the whole torchvision model (resize, normalisation, backbone, heads, NMS,
boxes in frame pixels) for one HxWx3 uint8 frame. Its second input is the size the model resizes
the frame to, computed here in float64 as torchvision does (:func:`resized_size`): traced graphs
compute it in float32 and are one pixel off on about one frame size in six. Mask models return each
detection's 28x28 mask probabilities; :func:`paste_mask` pastes them as torchvision does, only
inside the detection's box, instead of the graph's N full-frame masks.

Threads: one Nuclio worker uses every core the container may use (:func:`cpu_threads`). Speed: one
compiled model per frame size, with the resized size made a constant of the graph
(:func:`for_size`: static shapes throughout; CVAT tasks have one size), :data:`SHAPE_CACHE` sizes
kept, each with its reused infer request and input buffer; fully connected layers keep their bias
apart (:func:`gemm_bias_apart`). Precision is f32, set explicitly:
OpenVINO's default on CPUs with AMX or AVX512-BF16 is bf16, which moves scores by a few hundredths.
On AMX CPUs an engine whose packaging check chose it computes in bf16x3 instead
(:mod:`serverless.bf16x3`): f32-grade results, faster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serverless.bundle import (
    ENGINE_BIN,
    ENGINE_JSON,
    ENGINE_XML,
    WEIGHTS,
    BundleError,
    BundleInfo,
    ServedBundle,
    load_info,
)
from serverless.detections import Detections
from serverless.errors import UserError
from serverless.tiling import Part, frame_windows, inclusive_box, merge, window_part

log = logging.getLogger(__name__)

ENGINE_FORMAT = "cvat-detector-engine"
#: Version of the exported graph's contract (inputs, outputs, what engine.json records).
ENGINE_FORMAT_VERSION = 1
#: What serves a bundle: its PyTorch weights, or the verified OpenVINO export of them.
ENGINES = ("pytorch", "openvino")
#: OpenVINO arithmetic: f32 reproduces PyTorch; bf16x3 (:mod:`serverless.bf16x3`) too, faster on AMX
#: CPUs, where its packaging check chose it; bf16 is an opt-in whose agreement is measured.
PRECISIONS = ("f32", "bf16x3", "bf16")
#: Compiled models kept, one per frame (window) size.
SHAPE_CACHE = 4
#: Input names of the exported graph, and its outputs in order (masks: mask models only).
INPUTS = ("image", "size")
OUTPUTS = ("boxes", "scores", "labels", "masks")
#: Environment variable overriding the thread count (default: :func:`cpu_threads`).
THREADS_ENV = "CVAT_DETECTOR_THREADS"
#: Environment variable of the Nuclio function naming its engine (ENGINES; default pytorch).
ENGINE_ENV = "CVAT_DETECTOR_ENGINE"


@dataclass
class EngineInfo:
    """The content of ``engine.json``."""

    weights_sha256: str  # the weights.pt this graph was exported from
    min_size: int  # the model's resize: shorter side, longer-side cap, or one fixed square
    max_size: int
    fixed_size: bool
    masks: bool
    runtime: str = "openvino"
    exported_with: dict[str, str] = field(default_factory=dict)  # torch, torchvision, openvino versions
    verification: dict[str, Any] = field(default_factory=dict)  # frames and agreement with PyTorch
    format: str = ENGINE_FORMAT
    format_version: int = ENGINE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, bundle_dir: str | Path) -> EngineInfo:
        """engine.json of ``bundle_dir``; a BundleError when missing, foreign or newer than us."""
        path = Path(bundle_dir) / ENGINE_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(
                f"{bundle_dir}: no {ENGINE_JSON}; export the CPU engine first "
                "(python -m trainer package --cpu, or predict --engine openvino)"
            ) from None
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path}: invalid JSON: {exc}") from exc
        if data.get("format") != ENGINE_FORMAT:
            raise BundleError(f"{path}: not a cvat-detector engine (format={data.get('format')!r})")
        if data.get("format_version") != ENGINE_FORMAT_VERSION:
            raise BundleError(
                f"{path}: engine format version {data.get('format_version')!r}, this runtime reads "
                f"{ENGINE_FORMAT_VERSION}; export the engine again with this version of cvat-detector"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def weights_digest(path: str | Path) -> str:
    """sha256 of a weights file: ties an export to the weights it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resized_size(height: int, width: int, info: EngineInfo) -> tuple[int, int]:
    """The (height, width) torchvision's GeneralizedRCNNTransform resizes a frame to, in float64 as
    eager PyTorch computes it (``int(side * scale)``)."""
    if info.fixed_size:
        return info.min_size, info.min_size
    scale = min(info.min_size / min(height, width), info.max_size / max(height, width))
    return int(height * scale), int(width * scale)


def cpu_threads() -> int:
    """CPUs this container may use: the cgroup CPU quota (v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded down, at most the CPUs it may run on
    (``sched_getaffinity``), at least 1. ``CVAT_DETECTOR_THREADS`` overrides it."""
    override = os.environ.get(THREADS_ENV)
    if override:
        if not override.isdigit() or int(override) < 1:
            raise UserError(f"{THREADS_ENV}: expected a positive number of threads, got {override!r}")
        return int(override)
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(cpus, int(quota)) if quota else cpus)


def cpu_computes_bf16() -> bool:
    """Whether OpenVINO computes in bf16 here when asked (CPUs with AMX or AVX512-BF16); elsewhere it
    computes in f32 whatever it is asked."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota in CPUs, or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


class OpenVinoNetwork:
    """The exported graph, compiled once per window size, run on HxWx3 uint8 windows."""

    def __init__(self, xml: Path, threads: int, precision: str = "f32") -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise UserError(f"engine precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.threads, self.precision = threads, precision
        self._core = ov.Core()
        self._model = self._core.read_model(xml)  # as exported; each size's graph is made from it
        self._outputs = len(self._model.outputs)
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32" if precision == "f32" else "bf16",
        }
        self._requests: OrderedDict[tuple[tuple[int, int], tuple[int, int]], Any] = OrderedDict()

    def __call__(self, window: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
        """The graph's outputs (copies) for one window resized to ``size`` (height, width)."""
        request = self._request(window.shape[:2], (int(size[0]), int(size[1])))
        np.copyto(request.get_input_tensor(0).data, window)  # into the request's own buffer
        request.infer()
        return [np.array(request.get_output_tensor(i).data) for i in range(self._outputs)]

    def _request(self, hw: tuple[int, int], size: tuple[int, int]) -> Any:
        """The infer request of a model compiled for windows of ``hw`` resized to ``size``, compiling
        it on first use; the least recently used is dropped beyond :data:`SHAPE_CACHE`."""
        key = (hw, size)
        request = self._requests.get(key)
        if request is None:
            compiled = self._compile(hw, size)
            if compiled is None:  # bf16x3 could not serve it: f32 from now on
                return self._request(hw, size)
            request = self._requests[key] = compiled.create_infer_request()
            if len(self._requests) > SHAPE_CACHE:
                self._requests.popitem(last=False)
        self._requests.move_to_end(key)
        return request

    def _compile(self, hw: tuple[int, int], size: tuple[int, int]) -> Any:
        """The graph compiled for windows of ``hw`` resized to ``size`` (:func:`for_size`): in f32
        with :func:`gemm_bias_apart`, in bf16x3 rewritten for that size; None where bf16x3 would not
        be f32-faithful or could not be built, after which this network computes in f32."""
        model = for_size(self._model, hw, size)
        if self.precision == "f32":
            gemm_bias_apart(model)
        elif self.precision == "bf16x3":
            from serverless.bf16x3 import bf16x3_model

            try:
                model = bf16x3_model(self._core, model)
            except Exception as exc:  # a graph its rewrites do not know: f32 serves it as exported
                self._compute_in_f32(f"its rewrite failed ({type(exc).__name__}: {exc})")
                return None
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as exc:
            if self.precision != "bf16x3":
                raise
            self._compute_in_f32(f"it did not compile ({exc})")
            return None
        return None if self.precision == "bf16x3" and self._leaks_bf16(compiled) else compiled

    def _leaks_bf16(self, compiled: Any) -> bool:
        """Whether bf16x3 compiled to something other than f32 with bf16 convolutions
        (:func:`serverless.bf16x3.bf16_leaks`); then this network computes in f32 from now on."""
        from serverless.bf16x3 import bf16_leaks

        leaks = bf16_leaks(compiled)
        if leaks:
            self._compute_in_f32(f"it would compute {len(leaks)} layers in bf16 ({leaks[0]})")
        return bool(leaks)

    def _compute_in_f32(self, why: str) -> None:
        """Serve the export in f32 from now on: bf16x3 would not be f32-faithful."""
        log.warning("bf16x3: %s; computing in f32", why)
        self.precision = "f32"
        self._config["INFERENCE_PRECISION_HINT"] = "f32"
        self._requests.clear()


def for_size(model: Any, hw: tuple[int, int], size: tuple[int, int]) -> Any:
    """A copy of the exported ``model`` for HxWx3 windows of ``hw`` resized to ``size``, with the
    size input made a constant and folded in: every shape up to the RoI heads is then static, so
    OpenVINO fuses the element-wise chains it cannot fuse on dynamic shapes (x1.1 on MobileNet f32
    and R50 bf16x3, docs/benchmarks.md)."""
    import openvino.opset13 as ops
    from openvino.passes import ConstantFolding, Manager

    model = model.clone()
    size_input = next(p for p in model.get_parameters() if p.get_friendly_name() == INPUTS[1])
    dtype = size_input.get_element_type().to_dtype()
    size_input.output(0).replace(ops.constant(np.array(size, dtype)).output(0))
    model.remove_parameter(size_input)
    model.reshape({INPUTS[0]: [*hw, 3]})
    passes = Manager()
    passes.register_pass(ConstantFolding())
    passes.run_passes(model)
    return model


def gemm_bias_apart(model: Any) -> Any:
    """``model`` (an ``openvino.Model``, changed in place) with the bias of each fully connected
    layer added apart from its product, through a reshape the CPU plugin does not fuse across. With
    the bias (and ReLU) fused, the plugin runs an f32 fully connected layer with its brgemm kernels;
    without, with MLAS, about a fifth faster on the R-CNN box heads' 12544x1024 layer, whose 1000
    RoIs make it MobileNet's largest (docs/benchmarks.md). The sums are the same; the bias is then
    one more pass over 1000 rows."""
    import openvino.opset13 as ops

    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.input_value(1).get_node().get_type_name() != "Constant":
            continue
        shape, users = op.get_output_partial_shape(0), list(op.output(0).get_target_inputs())
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or len(users) != 1:
            continue
        add, port, columns = users[0].get_node(), users[0].get_index(), shape[1].get_length()
        other = add.input_value(1 - port).get_node() if add.get_type_name() == "Add" else None
        if other is None or other.get_type_name() != "Constant" or other.get_data().size != columns:
            continue
        rows = ops.reshape(op.output(0), np.array([-1, 1, columns], np.int64), False)
        bias = ops.reshape(add.input_value(1 - port), np.array([1, 1, columns], np.int64), False)
        sums = ops.reshape(ops.add(rows, bias), np.array([-1, columns], np.int64), False)
        add.output(0).replace(sums.output(0))
    return model


class EngineDetector(ServedBundle):
    """A bundle's verified OpenVINO export ready to detect objects in decoded RGB uint8 images: the
    API of :class:`serverless.detector.Detector`, on the CPU, without torch."""

    device = "cpu"

    def __init__(self, bundle_dir: str | Path, precision: str = "f32", threads: int | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.info: BundleInfo = load_info(bundle_dir)
        self.info.check_tiles(str(self.bundle_dir / "model.json"))
        self.engine = load_engine_info(bundle_dir)
        self.network = OpenVinoNetwork(self.bundle_dir / ENGINE_XML, threads or cpu_threads(), precision)

    @property
    def precision(self) -> str:
        """What the engine computes in (bf16x3 falls back to f32 where it would not be faithful)."""
        return self.network.precision

    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detections:
        """Detect objects in an HxWx3 uint8 RGB image."""
        floors = self.thresholds(threshold)
        h, w = image.shape[:2]
        windows = frame_windows(w, h, self.info.tile_size, self.info.tile_overlap, True)
        parts = [self._window(image, window, floors) for window in windows]
        return merge(parts, self.labels, self.info.detections_per_img)

    def _window(self, image: np.ndarray, window: tuple[int, int, int, int], floors: np.ndarray) -> Part:
        x0, y0, x1, y1 = window
        crop = image[y0:y1, x0:x1]
        outputs = self.network(crop, resized_size(y1 - y0, x1 - x0, self.engine))
        boxes, scores, labels = outputs[:3]
        part, keep = window_part(boxes, scores, labels, window, image.shape[1::-1], floors)
        if self.has_masks:
            part.mask_boxes = [inclusive_box(box, window) for box in part.boxes]
            part.masks = [
                paste_mask(outputs[3][k, 0], boxes[k], (xa - x0, ya - y0, xb - x0, yb - y0), crop.shape[:2])
                for k, (xa, ya, xb, yb) in zip(keep.tolist(), part.mask_boxes, strict=True)
            ]
        return part


def load_engine_info(bundle_dir: str | Path) -> EngineInfo:
    """engine.json, after checking that the export exists and was made from these weights."""
    bundle_dir = Path(bundle_dir)
    info = EngineInfo.load(bundle_dir)
    for name in (ENGINE_XML, ENGINE_BIN):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir}: {ENGINE_JSON} without {name}; export the engine again")
    weights = bundle_dir / WEIGHTS
    if weights.is_file() and weights_digest(weights) != info.weights_sha256:
        raise BundleError(
            f"{bundle_dir}: the engine was exported from other weights than {WEIGHTS}; export it again "
            "(python -m trainer package --cpu, or predict --engine openvino)"
        )
    return info


def open_detector(
    bundle_dir: str | Path, device: str = "auto", engine: str = "pytorch", precision: str = "auto"
) -> Any:
    """The detector serving a bundle: :class:`EngineDetector` for ``openvino`` (CPU only), else the
    PyTorch :class:`serverless.detector.Detector` on ``device`` in ``precision`` (one of
    :data:`serverless.precision.MODES`; torch is imported only then). On the
    CPU, both use :func:`cpu_threads` intra-op threads (PyTorch's own default counts the host's
    cores, not the container's quota)."""
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "openvino":
        if device not in ("auto", "cpu"):
            raise UserError(f"engine openvino runs on the CPU; got device {device!r} (use cpu or auto)")
        return EngineDetector(bundle_dir, _engine_precision(bundle_dir, precision))
    import torch

    from serverless.detector import Detector

    detector = Detector(bundle_dir, device, precision)
    if detector.device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    return detector


def _engine_precision(bundle_dir: str | Path, precision: str) -> str:
    """The OpenVINO arithmetic for a serving precision mode. ``auto``: bf16x3 where the engine's
    packaging check chose it and this CPU has AMX, else f32; ``off``: f32; ``bf16``: bf16, which the
    check must have found to keep the detections (``package --engine-precision bf16``)."""
    if precision not in ("auto", "off", "bf16"):
        raise UserError(f"precision {precision!r}: the OpenVINO engine computes in f32 (auto, off) or bf16")
    verification = load_engine_info(bundle_dir).verification
    if precision == "auto" and verification.get("bf16x3", {}).get("chosen"):
        from serverless.bf16x3 import cpu_has_amx

        if cpu_has_amx():
            return "bf16x3"
        log.info("bf16x3 was chosen at packaging, but this CPU has no AMX: computing in f32")
    if precision in ("auto", "off"):
        return "f32"
    if not verification.get("bf16", {}).get("same"):
        raise BundleError(
            f"{bundle_dir}: bf16 was not verified to keep this engine's detections; package it with "
            "--cpu --engine-precision bf16, or serve it in f32"
        )
    return "bf16"


# ---------------------------------------------------------------- masks, as torchvision pastes them

#: torchvision pads the 28x28 mask by one pixel on each side and grows its box to match.
MASK_PADDING = 1


def paste_mask(
    probs: np.ndarray, box: np.ndarray, crop: tuple[int, int, int, int], hw: tuple[int, int]
) -> np.ndarray:
    """``probs`` (MxM mask probabilities of a detection whose box is ``box``) pasted into an image of
    ``hw`` as torchvision's ``paste_masks_in_image`` does, binarised at 0.5, only inside the inclusive
    box ``crop`` (x0, y0, x1, y1 image pixels)."""
    m = probs.shape[-1]
    padded = np.pad(np.asarray(probs, np.float32), MASK_PADDING)
    scale = np.float32((m + 2 * MASK_PADDING) / m)
    half = (box[2:] - box[:2]) * np.float32(0.5) * scale
    centre = (box[2:] + box[:2]) * np.float32(0.5)
    bx0, by0 = (centre - half).astype(np.int64)
    bx1, by1 = (centre + half).astype(np.int64)
    w, h = max(int(bx1 - bx0 + 1), 1), max(int(by1 - by0 + 1), 1)
    xs, ys = np.arange(crop[0], crop[2] + 1), np.arange(crop[1], crop[3] + 1)
    inside_x = (xs >= max(bx0, 0)) & (xs < min(bx1 + 1, hw[1])) & (xs - bx0 < w)
    inside_y = (ys >= max(by0, 0)) & (ys < min(by1 + 1, hw[0])) & (ys - by0 < h)
    x0, x1, wx0, wx1 = _linear_taps(np.clip(xs - bx0, 0, w - 1), padded.shape[1], w)
    y0, y1, wy0, wy1 = _linear_taps(np.clip(ys - by0, 0, h - 1), padded.shape[0], h)
    rows0 = padded[y0][:, x0] * wx0 + padded[y0][:, x1] * wx1
    rows1 = padded[y1][:, x0] * wx0 + padded[y1][:, x1] * wx1
    value = rows0 * wy0[:, None] + rows1 * wy1[:, None]
    return (value >= 0.5) & inside_y[:, None] & inside_x[None, :]


def _linear_taps(dst: np.ndarray, in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis,
    in float32 as its CPU kernel computes them."""
    scale = np.float32(in_size) / np.float32(out_size)
    real = np.maximum(scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.clip(real - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, np.float32(1) - lam, lam
