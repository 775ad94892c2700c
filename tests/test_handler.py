"""The Nuclio handler called as Nuclio calls it (nuclio_sdk.test.Platform), with bodies as CVAT
sends them: every frame kind CVAT holds, with and without a threshold, bad requests, errors."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nuclio_sdk
import numpy as np
import pytest
import torch
from nuclio_sdk.test import Platform
from PIL import Image

from serverless import main
from serverless.cvat_shapes import to_cvat_shapes
from serverless.detector import Detector
from tests.test_shapes import assert_cvat_shapes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAPTURES = Path(__file__).parent / "data" / "cvat_captures"  # a copy of ../shared/cvat-captures
CAPTURE = CAPTURES / "interactive_request_body.json"
LABELS = ["cell", "debris"]
W, H = 96, 64


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def started_platform(**env: str) -> Platform:
    """A Platform whose handler context is initialised (init_context ran) under ``env``."""
    platform = Platform()
    with _environ(**env):
        status, _ = call(platform, {"image": _b64(_encode(_frame(), "PNG"))})
    assert status == 200
    return platform


def call(platform: Platform, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
    response = platform.call_handler(
        main.handler, nuclio_sdk.Event(body=body, content_type=content_type)
    )
    assert response.content_type == "application/json"
    assert isinstance(response.body, str)  # a JSON string: never a bare list (a batch to Nuclio)
    return response.status_code, json.loads(response.body)


def handler_context(platform: Platform) -> Any:
    """The handler's context (user_data holds the detector), through the Platform's public API."""
    seen = []
    platform.call_handler_with_context_mutation(
        main.handler, nuclio_sdk.Event(body={}), lambda c: seen.append(c) or c
    )
    return seen[0]


def _frame(w: int = W, h: int = H, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw: Any) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle(LABELS, min_size=96, max_size=128)


@pytest.fixture(scope="module")
def platform(bundle) -> Platform:
    return started_platform(CVAT_DETECTOR_BUNDLE=str(bundle))


def test_captured_cvat_request_byte_for_byte(platform):
    raw = CAPTURE.read_bytes()
    with Image.open(io.BytesIO(base64.b64decode(json.loads(raw)["image"]))) as img:
        width, height = img.size
    as_dict, as_bytes = call(platform, json.loads(raw)), call(platform, raw, "text/plain")
    assert as_dict == as_bytes  # Nuclio parses application/json itself; other types arrive as bytes
    status, shapes = as_dict
    assert status == 200 and shapes  # threshold absent: the bundle's default (0 here) applies
    assert_cvat_shapes(shapes, width, height, LABELS)
    assert {s["type"] for s in shapes} == {"rectangle"}


def _sixteen_bit_tiff(array: np.ndarray) -> bytes:
    gray = array[..., 0].astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "TIFF")  # PIL writes uint16 as mode I;16
    return buf.getvalue()


def _stored(data: bytes) -> np.ndarray:
    """The pixels a file holds, as Pillow reads them without any conversion."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


class _Spy(torch.nn.Module):
    """The bundle's network, recording each image it is given as the uint8 frame it came from."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, images: list[torch.Tensor]) -> Any:
        self.seen += [(i * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for i in images]
        return self.net(images)


#: Frame kinds: how the frame (an RGB array) is written, and what the network must then receive,
#: computed from the array and the stored pixels, not by the decoder.
FRAME_KINDS = {
    "jpeg": (lambda a: _encode(a, "JPEG", quality=90), lambda a, data: _stored(data)),
    "png": (lambda a: _encode(a, "PNG"), lambda a, data: a),
    "rgba": (lambda a: _encode(a, "PNG", mode="RGBA"), lambda a, data: a),  # opaque alpha
    "grayscale": (lambda a: _encode(a, "PNG", mode="L"), lambda a, data: _as_rgb(_stored(data))),
    "bmp": (lambda a: _encode(a, "BMP"), lambda a, data: a),
    "tiff16": (_sixteen_bit_tiff, lambda a, data: _as_rgb(a[..., 0])),  # v * 257 scales back to v
}


@pytest.mark.parametrize("kind", FRAME_KINDS)
def test_every_frame_kind_gives_contract_shapes(platform, kind, monkeypatch):
    encode, expected = FRAME_KINDS[kind]
    detector = handler_context(platform).user_data.detector
    spy = _Spy(detector.model)
    monkeypatch.setattr(detector, "model", spy)
    data = encode(_frame())
    status, shapes = call(platform, {"image": _b64(data), "threshold": 0.0})
    assert status == 200 and shapes
    assert_cvat_shapes(shapes, W, H, LABELS)
    (seen,) = spy.seen
    assert np.array_equal(seen, expected(_frame(), data))


def test_exif_rotated_frame_is_answered_in_displayed_coordinates(platform, bundle):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise: 64 wide, 96 high
    data = _encode(_frame(), "JPEG", quality=95, exif=exif)
    with Image.open(io.BytesIO(data)) as img:
        stored = np.asarray(img.convert("RGB"))
    displayed = np.ascontiguousarray(np.rot90(stored, k=-1))
    expected = to_cvat_shapes(Detector(bundle, "cpu").detect(displayed, 0.0))

    status, shapes = call(platform, {"image": _b64(data), "threshold": 0.0})
    assert status == 200 and shapes
    assert shapes == json.loads(json.dumps(expected))
    assert_cvat_shapes(shapes, H, W, LABELS)


class _Fixed(torch.nn.Module):
    """Stands in for the network: the same scored boxes for any frame."""

    SCORES = (0.9, 0.6, 0.35, 0.25, 0.1)
    LABELS = (1, 2, 1, 2, 1)  # cell, debris, cell, debris, cell

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = len(self.SCORES)
        boxes = torch.tensor([[4.0 * i, 2.0 * i, 4.0 * i + 20, 2.0 * i + 10] for i in range(n)])
        result = {
            "boxes": boxes,
            "scores": torch.tensor(self.SCORES),
            "labels": torch.tensor(self.LABELS),
        }
        return [result for _ in images]


def _confidences(shapes: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(s["label"], float(s["confidence"])) for s in shapes]


def test_threshold_filters_and_its_absence_means_the_calibrated_ones(
    platform, bundle, tmp_path, monkeypatch
):
    frame = {"image": _b64(_encode(_frame(), "PNG"))}
    monkeypatch.setattr(handler_context(platform).user_data.detector, "model", _Fixed())
    assert _confidences(call(platform, {**frame, "threshold": 0.5})[1]) == [
        ("cell", 0.9), ("debris", 0.6),
    ]  # fmt: skip
    assert len(call(platform, {**frame, "threshold": 0.3})[1]) == 3
    assert len(call(platform, {**frame, "threshold": 0})[1]) == 5
    assert call(platform, {**frame, "threshold": 1.0})[1] == []

    calibrated = tmp_path / "calibrated"
    shutil.copytree(bundle, calibrated)
    info = json.loads((calibrated / "model.json").read_text())
    info.update(threshold=0.5, class_thresholds={"debris": 0.2})
    (calibrated / "model.json").write_text(json.dumps(info))
    other = started_platform(CVAT_DETECTOR_BUNDLE=str(calibrated), CVAT_DETECTOR_MAX_PIXELS=str(W * H))
    handler_context(other).user_data.detector.model = _Fixed()
    assert _confidences(call(other, frame)[1]) == [  # no threshold sent: the calibrated ones
        ("cell", 0.9), ("debris", 0.6), ("debris", 0.25),
    ]  # fmt: skip
    assert _confidences(call(other, {**frame, "threshold": None})[1]) == _confidences(
        call(other, frame)[1]
    )
    assert len(call(other, {**frame, "threshold": 0.3})[1]) == 3  # the user's, for every label

    status, body = call(other, {"image": _b64(_encode(_frame(W + 1, H), "PNG"))})
    assert status == 400 and "over the limit" in body["error"]


BAD_REQUESTS = [
    (b"not json at all", "not valid JSON"),
    (b'["image"]', "expected a JSON object"),
    ({}, 'no "image" field'),
    ({"image": 5}, "image: expected a non-empty base64 string"),
    ({"image": ""}, "image: expected a non-empty base64 string"),
    ({"image": "@@ not base64 @@"}, "image: not valid base64"),
    ({"image": _b64(b"hello, not an image")}, "image: not a readable image"),
    ({"image": _b64(_encode(_frame(), "PNG")[:60])}, "image: not a readable image"),
    ({"image": _b64(_encode(_frame(), "PNG")), "threshold": "high"}, "threshold"),
    ({"image": _b64(_encode(_frame(), "PNG")), "threshold": 1.5}, "threshold"),
    ({"image": _b64(_encode(_frame(), "PNG")), "threshold": -0.1}, "threshold"),
    ({"image": _b64(_encode(_frame(), "PNG")), "threshold": True}, "threshold"),
]


def test_bad_requests_get_400_and_the_worker_keeps_serving(platform):
    for body, message in BAD_REQUESTS:
        content_type = "text/plain" if isinstance(body, bytes) else "application/json"
        status, payload = call(platform, body, content_type)
        assert status == 400, body
        assert set(payload) == {"error"} and message in payload["error"], payload
    status, shapes = call(platform, {"image": _b64(_encode(_frame(), "PNG")), "threshold": 0.0})
    assert status == 200 and shapes


def test_wrapped_base64_lines_are_accepted(platform):
    encoded = base64.encodebytes(_encode(_frame(), "PNG")).decode("ascii")  # MIME: 76-char lines
    assert "\n" in encoded
    status, shapes = call(platform, {"image": encoded, "threshold": 0.0})
    assert status == 200 and shapes


def test_internal_error_is_a_500_without_traceback_and_the_worker_recovers(platform, monkeypatch):
    detector = handler_context(platform).user_data.detector

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret /opt/nuclio/bundle detail")

    monkeypatch.setattr(detector, "detect", broken)
    request = {"image": _b64(_encode(_frame(), "PNG"))}
    status, payload = call(platform, request)
    assert status == 500 and "RuntimeError" in payload["error"]
    assert "Traceback" not in payload["error"] and "secret" not in payload["error"]
    monkeypatch.undo()
    assert call(platform, request)[0] == 200


class _BrightBlob(torch.nn.Module):
    """Stands in for Mask R-CNN: one 'cell' whose mask is the input's bright pixels."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            on = image[0] > 0.9
            ys, xs = torch.nonzero(on, as_tuple=True)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            outputs.append({
                "boxes": torch.tensor([box], dtype=torch.float32),
                "scores": torch.tensor([0.75]),
                "labels": torch.tensor([1]),
                "masks": on[None, None].float(),
            })  # fmt: skip
        return outputs


def test_mask_detections_reach_cvat_as_bitmap_and_polygon(platform, monkeypatch):
    monkeypatch.setattr(handler_context(platform).user_data.detector, "model", _BrightBlob())
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    frame[10:30, 40:52] = 255
    frame[30:34, 40:44] = 255  # an L: 12x20 block with a 4x4 foot
    status, shapes = call(platform, {"image": _b64(_encode(frame, "PNG"))})
    assert status == 200
    assert_cvat_shapes(shapes, W, H, LABELS)
    (shape,) = shapes
    assert shape["label"] == "cell" and shape["confidence"] == "0.75"
    assert shape["mask"][-4:] == [40, 10, 51, 33]
    bitmap = np.array(shape["mask"][:-4]).reshape(24, 12) == 255
    assert np.array_equal(bitmap, frame[10:34, 40:52, 0] == 255)
    assert shape["points"] == [
        40.0,
        10.0,
        52.0,
        10.0,
        52.0,
        30.0,
        44.0,
        30.0,
        44.0,
        34.0,
        40.0,
        34.0,
    ]


@pytest.mark.parametrize("name", ["interactive_request_body.json", "cvat_lambda_functions_listing.json"])
def test_shipped_captures_are_the_shared_ones(name):
    shared = SHARED / "cvat-captures" / name
    if not shared.is_file():
        pytest.skip(f"{shared} is not here (a clone without ../shared)")
    assert (CAPTURES / name).read_bytes() == shared.read_bytes()
