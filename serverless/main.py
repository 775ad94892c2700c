"""The Nuclio function CVAT calls: ``init_context`` loads the bundle, ``handler`` serves a frame.

Request (the CVAT ⇄ Nuclio contract in docs/design.md): POST JSON ``{"image": base64 of the frame file,
"threshold": number}``. ``threshold`` is absent when the CVAT user set none; the bundle's calibrated
thresholds apply then. Response: 200 with a JSON list of shapes (:mod:`serverless.cvat_shapes`).
A request that cannot be served as sent (no image, bad base64, not an image, too many pixels, bad
threshold) gets a 400 JSON ``{"error": ...}`` naming the field; any other failure a 500 JSON error
whose traceback goes to the log, never to CVAT. Either way the worker keeps its model and goes on.

Settings (environment, ``spec.env`` in function.yaml):

- ``CVAT_DETECTOR_BUNDLE``: the bundle directory; default ``bundle`` beside the ``serverless``
  package, which is ``/opt/nuclio/bundle`` in a function made by ``python -m trainer package``.
- ``CVAT_DETECTOR_DEVICE``: ``auto`` (default: the GPU when one is visible), ``cuda:1``, ``cpu``.
- ``CVAT_DETECTOR_ENGINE``: ``pytorch`` (default) or ``openvino``: the bundle's verified OpenVINO
  export on the CPU, without importing torch (``package --cpu`` sets it; :mod:`serverless.engine`).
- ``CVAT_DETECTOR_THREADS``: intra-op threads on the CPU (default: the container's CPU quota).
- ``CVAT_DETECTOR_PRECISION``: ``auto`` (default: bf16 on GPUs of compute capability 8.0+, fp16 on
  7.x, else fp32; :mod:`serverless.precision`), ``bf16``, ``fp16``, ``off`` (fp32). The OpenVINO
  engine computes in f32, or in bf16 where ``package --engine-precision bf16`` verified it.
- ``CVAT_DETECTOR_GPU_JPEG``: ``auto`` (default: JPEG frames are decoded on the GPU where that gives
  the shared decoder's pixels; :mod:`serverless.gpu_jpeg`) or ``off``.
- ``CVAT_DETECTOR_MAX_PIXELS``: largest frame accepted (default :data:`imageio.MAX_PIXELS`).
- ``CVAT_DETECTOR_SCORE_ATTRIBUTE``, ``CVAT_DETECTOR_SCORE_FORMAT``: return each detection's score as
  this attribute (see :mod:`serverless.score_attribute`); unset: no attributes.
"""

from __future__ import annotations

import base64
import json
import os
import reprlib
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serverless.cvat_shapes import to_cvat_shapes
from serverless.engine import ENGINE_ENV, ENGINES, open_detector
from serverless.imageio import ImageDecodeError, decode_image, frame_size, pixel_limit
from serverless.precision import MODES, PRECISION_ENV
from serverless.score_attribute import ScoreAttribute

BUNDLE_ENV = "CVAT_DETECTOR_BUNDLE"
DEVICE_ENV = "CVAT_DETECTOR_DEVICE"
GPU_JPEG_ENV = "CVAT_DETECTOR_GPU_JPEG"
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundle"

_EXPECTED = 'expected a JSON object {"image": "<base64 of the frame file>", "threshold": 0.5}'


class BadRequest(ValueError):
    """The request cannot be served as sent; the message names the field and what was expected."""


@dataclass(frozen=True)
class Request:
    image: bytes  # the encoded frame file
    threshold: float | None  # None: the bundle's calibrated thresholds


def init_context(context: Any) -> None:
    """Load the bundle once per worker, on the GPU when present, and warm it up."""
    bundle = Path(os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE)
    max_pixels = pixel_limit()
    precision = _env_choice(PRECISION_ENV, MODES)
    gpu_jpeg = _env_choice(GPU_JPEG_ENV, ("auto", "off"))
    score = ScoreAttribute.from_env()
    start = time.perf_counter()
    engine = _env_choice(ENGINE_ENV, ENGINES)
    detector = open_detector(bundle, os.environ.get(DEVICE_ENV) or "auto", engine, precision)
    loaded = time.perf_counter()
    detector.warmup()
    decoder = _frame_decoder(detector, engine, gpu_jpeg)
    context.user_data.detector = detector
    context.user_data.decoder = decoder
    context.user_data.max_pixels = max_pixels
    context.user_data.score = score
    device = detector.device
    context.logger.info_with(
        "cvat-detector model loaded",
        bundle=str(bundle),
        architecture=detector.info.architecture,
        labels=detector.labels,
        shape_type=detector.info.shape_type,
        device=str(device),
        engine=engine,
        gpu=_gpu_name(device),
        precision=str(detector.precision),
        gpu_jpeg=_gpu_jpeg(decoder),
        load_s=round(loaded - start, 2),
        warmup_s=round(time.perf_counter() - loaded, 2),
        score_attribute=f"{score.name} ({score.fmt})" if score else None,
    )


def handler(context: Any, event: Any) -> Any:
    """Detect objects in one frame and answer with CVAT shapes (see the module docstring)."""
    start = time.perf_counter()
    try:
        request = parse_request(event.body)
        image = context.user_data.decoder.decode(request.image, "image", context.user_data.max_pixels)
        detections = context.user_data.detector.detect(image, request.threshold)
        shapes = to_cvat_shapes(detections, score=context.user_data.score)
    except (BadRequest, ImageDecodeError) as exc:
        context.logger.warn_with("request rejected", error=str(exc))
        return _response(context, {"error": str(exc)}, 400)
    except Exception as exc:
        context.logger.error_with(
            "inference failed", error=repr(exc), traceback=traceback.format_exc()
        )
        error = f"internal error ({type(exc).__name__}); the function log has the details"
        return _response(context, {"error": error}, 500)
    height, width = frame_size(image)
    context.logger.debug_with(
        "frame done",
        width=width,
        height=height,
        shapes=len(shapes),
        ms=round((time.perf_counter() - start) * 1000, 1),
    )
    return _response(context, shapes, 200)


def parse_request(body: Any) -> Request:
    """Validate a request body: a dict (content type ``application/json``) or raw JSON bytes."""
    if isinstance(body, bytes | bytearray | memoryview | str):
        try:
            body = json.loads(bytes(body) if not isinstance(body, str) else body)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON ({exc}); {_EXPECTED}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body: {_EXPECTED}, got {type(body).__name__}")
    image = body.get("image")
    if image is None:
        raise BadRequest(f'request body has no "image" field; {_EXPECTED}')
    if not isinstance(image, str) or not image:
        raise BadRequest(f"image: expected a non-empty base64 string, got {_show(image)}")
    return Request(image=_b64decode(image), threshold=parse_threshold(body.get("threshold")))


def parse_threshold(value: Any) -> float | None:
    """A score threshold in [0, 1], or None when absent (null is absent: CVAT drops it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise BadRequest(f"threshold: expected a number between 0 and 1, got {_show(value)}")
    return float(value)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        pass
    try:  # MIME-style base64 wraps lines; anything else outside the alphabet is an error
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError as exc:
        raise BadRequest(f"image: not valid base64 ({exc})") from None


def _show(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable's value, one of ``choices``; unset or empty is the first."""
    value = os.environ.get(name) or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


class _CpuDecoder:
    """Request frames decoded by :func:`serverless.imageio.decode_image`: the OpenVINO function's
    decoder (its image has no torch, and its frames are for the CPU anyway)."""

    on_gpu = False
    subsamplings: frozenset[int] = frozenset()
    decode = staticmethod(decode_image)


def _frame_decoder(detector: Any, engine: str, gpu_jpeg: str) -> Any:
    """:class:`serverless.gpu_jpeg.FrameDecoder` for PyTorch (JPEGs on the GPU where it may), else
    :class:`_CpuDecoder`; gpu_jpeg imports torch, so only the PyTorch detector imports it."""
    if engine != "pytorch":
        return _CpuDecoder()
    from serverless.gpu_jpeg import FrameDecoder

    return FrameDecoder(detector.device, enabled=gpu_jpeg == "auto")


def _gpu_jpeg(decoder: Any) -> list[str] | str:
    """The chroma subsamplings the GPU decodes, for the start-up log; "off" when none."""
    if not decoder.subsamplings:
        return "off"
    from serverless.gpu_jpeg import SUBSAMPLINGS

    return [SUBSAMPLINGS[code] for code in sorted(decoder.subsamplings)]


def _gpu_name(device: Any) -> str | None:
    """The GPU's name; torch is imported only for a GPU (the OpenVINO function has no torch)."""
    if getattr(device, "type", device) != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(device)


def _response(context: Any, payload: Any, status: int) -> Any:
    return context.Response(
        body=json.dumps(payload),
        headers={},
        content_type="application/json",
        status_code=status,
    )
