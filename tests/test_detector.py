"""The shared Detector: its public API, sliced inference on large frames, out-of-memory retries."""

from __future__ import annotations

import itertools
import json
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from serverless.bundle import BundleError
from serverless.detector import Detections, Detector
from serverless.tiling import tile_windows
from tests.factories import MASK_BUNDLE


class BrightBlobs(torch.nn.Module):
    """Stands in for a detector: one 'cell' box (and mask) around the bright pixels (red > 0.9) of
    each object in each input; an object's pixels share their green value.

    ``max_side``: inputs larger than this see nothing (an object too small for the full frame).
    ``oom_pixels``: inputs with more pixels raise CUDA's out-of-memory error."""

    def __init__(self, max_side: int | None = None, oom_pixels: int | None = None) -> None:
        super().__init__()
        self.max_side, self.oom_pixels = max_side, oom_pixels
        self.seen: list[tuple[int, int]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            self.seen.append((w, h))
            if self.oom_pixels and w * h > self.oom_pixels:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            bright = image[0] > 0.9
            if self.max_side and max(w, h) > self.max_side:
                bright = torch.zeros_like(bright)
            ons = [bright & (image[1] == g) for g in image[1][bright].unique()]
            boxes = []
            for on in ons:
                ys, xs = torch.nonzero(on, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            n = len(ons)
            outputs.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                "scores": torch.full((n,), 0.9),
                "labels": torch.ones(n, dtype=torch.int64),
                "masks": torch.stack(ons)[:, None].float() if n else torch.zeros(0, 1, h, w),
            })  # fmt: skip
        return outputs


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle(["cell", "debris"], min_size=96, max_size=128)


def _tiled(bundle: Path, model: torch.nn.Module, tile: int = 128, overlap: int = 48) -> Detector:
    detector = Detector(bundle, "cpu")
    detector.info.tile_size, detector.info.tile_overlap = tile, overlap
    detector.model = model
    return detector


def _scene(*boxes: tuple[int, int, int, int], w: int = 300, h: int = 200) -> np.ndarray:
    """Black frame with white objects; an object after the first is told apart by its green."""
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        frame[y0:y1, x0:x1] = (255, 255 - k, 255)
    return frame


def test_public_api_returns_sorted_detections_in_image_pixels(bundle):
    detector = Detector(bundle, device="cpu")
    assert detector.labels == ["cell", "debris"] and not detector.has_masks
    assert detector.info.architecture == "fasterrcnn_mobilenet_v3_large_fpn"
    detector.warmup()
    image = np.random.default_rng(0).integers(0, 255, (70, 110, 3), dtype=np.uint8)
    det = detector.detect(image, threshold=0.0)
    assert isinstance(det, Detections) and len(det) > 0
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert (det.boxes[:, 0::2] >= 0).all() and (det.boxes[:, 0::2] <= 110).all()
    assert (det.boxes[:, 1::2] >= 0).all() and (det.boxes[:, 1::2] <= 70).all()
    assert (np.diff(det.scores) <= 0).all() and set(det.labels) <= {"cell", "debris"}
    assert len(detector.detect(image, threshold=1.0)) == 0


def test_a_decoded_tensor_frame_gives_what_its_array_gives(bundle):
    """Frames decoded on the GPU reach detect as 3xHxW uint8 tensors."""
    detector = Detector(bundle, device="cpu")
    image = np.random.default_rng(3).integers(0, 255, (70, 110, 3), dtype=np.uint8)
    from_array = detector.detect(image, threshold=0.0)
    from_tensor = detector.detect(torch.from_numpy(image).permute(2, 0, 1).contiguous(), threshold=0.0)
    assert len(from_array) > 0 and from_tensor.labels == from_array.labels
    np.testing.assert_array_equal(from_tensor.boxes, from_array.boxes)


def test_a_read_only_frame_is_detected_like_its_writable_copy(bundle, monkeypatch):
    """``np.asarray(PIL image)`` is read-only: torch must never be handed it (it warns, and may
    write), so it gets a copy."""
    detector = Detector(bundle, device="cpu")
    image = np.random.default_rng(4).integers(0, 255, (70, 110, 3), dtype=np.uint8)
    read_only = image.copy()
    read_only.flags.writeable = False
    handed = []
    from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: handed.append(a.flags.writeable) or from_numpy(a))
    got, expected = detector.detect(read_only, threshold=0.0), detector.detect(image, threshold=0.0)
    assert handed == [True, True] and len(expected) > 0 and got.labels == expected.labels
    np.testing.assert_array_equal(got.boxes, expected.boxes)


@pytest.mark.parametrize("tile, overlap", [(128, 48), (64, 0), (100, 99), (512, 128)])
def test_tile_windows_cover_the_frame_with_the_promised_overlap(tile, overlap):
    for width, height in [(300, 200), (64, 64), (1000, 37), (513, 1024)]:
        windows = tile_windows(width, height, tile, overlap)
        covered = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in windows:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert x1 - x0 <= tile and y1 - y0 <= tile
            covered[y0:y1, x0:x1] = True
        assert covered.all()
        for axis in (0, 1):
            spans = sorted({(w[axis], w[axis + 2]) for w in windows})
            assert all(a1 - b0 >= overlap for (_, a1), (b0, _) in itertools.pairwise(spans))


def test_object_cut_by_tiles_is_found_once_with_its_whole_box_and_mask(bundle):
    model = BrightBlobs()
    detector = _tiled(bundle, model)
    det = detector.detect(_scene((110, 50, 150, 90)))  # crosses several tile edges
    assert len(model.seen) > 1  # the full frame and its tiles went through the network
    assert det.labels == ["cell"] and det.boxes.tolist() == [[110, 50, 150, 90]]
    assert det.mask_boxes == [(110, 50, 149, 89)] and det.masks[0].shape == (40, 40)
    assert det.masks[0].all()


def test_small_object_seen_only_in_tiles_is_kept_whole_once(bundle):
    detector = _tiled(bundle, BrightBlobs(max_side=128))  # the full frame misses it
    det = detector.detect(_scene((118, 60, 140, 80)))  # smaller than the overlap, across a cut
    assert det.boxes.tolist() == [[118, 60, 140, 80]]


def test_frames_up_to_one_tile_are_not_sliced(bundle):
    model = BrightBlobs()
    det = _tiled(bundle, model).detect(_scene((10, 10, 20, 20), w=128, h=100))
    assert model.seen == [(128, 100)] and len(det) == 1


def test_out_of_memory_frame_is_retried_in_tiles(bundle, caplog):
    model = BrightBlobs(oom_pixels=128 * 128)
    detector = _tiled(bundle, model)
    with caplog.at_level(logging.WARNING, logger="serverless.detector"):
        det = detector.detect(_scene((20, 20, 60, 50)))
    assert det.boxes.tolist() == [[20, 20, 60, 50]] and det.masks[0].shape == (30, 40)
    assert model.seen[0] == (300, 200) and all(w * h <= 128 * 128 for w, h in model.seen[1:])
    assert "retrying in 128 px tiles" in caplog.text


def test_out_of_memory_on_every_window_is_raised_on_a_cpu_detector(bundle):
    detector = _tiled(bundle, BrightBlobs(oom_pixels=1))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        detector.detect(_scene((20, 20, 60, 50)))


class FailsFirst(BrightBlobs):
    """Runs out of memory on its first call after making a tensor, as a real forward pass would;
    then records which tensors of that failed attempt are still alive on each later call."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[weakref.ref] = []
        self.alive_later: list[list[bool]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if not self.failed:
            features = torch.ones(64, 64)
            self.failed = [weakref.ref(features), weakref.ref(images[0])]
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.alive_later.append([ref() is not None for ref in self.failed])
        return super().forward(images)


def test_the_retry_runs_after_the_failed_attempt_released_its_tensors(bundle):
    model = FailsFirst()
    det = _tiled(bundle, model).detect(_scene((20, 20, 60, 50)))
    assert model.alive_later and not any(any(alive) for alive in model.alive_later)
    assert det.boxes.tolist() == [[20, 20, 60, 50]]


def _on_fake_gpu(detector: Detector, model: torch.nn.Module, monkeypatch) -> Detector:
    """The detector believes it runs ``model`` on a GPU; frames stay on the host."""
    detector.device, detector.model = torch.device("cuda"), model
    monkeypatch.setattr(detector, "_upload", lambda image, device: torch.from_numpy(image).permute(2, 0, 1))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return detector


@pytest.mark.parametrize("tile", [None, 128])
def test_gpu_out_of_memory_falls_back_to_the_cpu(bundle, monkeypatch, caplog, tile):
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    expected = _tiled(bundle, Detector(bundle, "cpu").model, tile=tile).detect(image, 0.0)
    gpu = BrightBlobs(oom_pixels=1)  # every window fails
    detector = _on_fake_gpu(_tiled(bundle, gpu, tile=tile), gpu, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="serverless.detector"):
        det = detector.detect(image, 0.0)
    assert gpu.seen == [(300, 200)] + ([(128, 128)] if tile else [])  # the frame, then one tile
    assert "running it on the CPU" in caplog.text
    assert len(det) > 0 and det.labels == expected.labels
    np.testing.assert_allclose(det.boxes, expected.boxes, atol=1e-3)


def test_a_tile_only_retry_returns_one_large_object_once(bundle):
    model = BrightBlobs(oom_pixels=128 * 128)  # no full-frame pass: 8 tiles each see a part
    det = _tiled(bundle, model).detect(_scene((15, 55, 285, 145)))  # 270x90
    assert len(model.seen) == 1 + 8
    assert det.boxes.tolist() == [[15, 55, 285, 145]] and det.labels == ["cell"]
    assert det.mask_boxes == [(15, 55, 284, 144)] and det.masks[0].shape == (90, 270)
    assert det.masks[0].all()


def test_neighbouring_large_objects_of_one_class_stay_apart_in_tiles(bundle):
    model = BrightBlobs(oom_pixels=128 * 128)
    det = _tiled(bundle, model).detect(_scene((10, 60, 130, 100), (132, 60, 290, 100)))
    assert sorted(det.boxes.tolist()) == [[10, 60, 130, 100], [132, 60, 290, 100]]


def test_fragments_join_across_tiles_that_only_touch(bundle):
    model = BrightBlobs(max_side=128)  # the full frame misses it; tiles 0-128 and 128-256 meet
    det = _tiled(bundle, model, tile=128, overlap=0).detect(_scene((40, 30, 220, 70), w=256, h=100))
    assert det.boxes.tolist() == [[40, 30, 220, 70]]


def test_real_tiled_inference_stays_in_the_frame(bundle, tmp_path):
    tiled = tmp_path / "tiled"
    tiled.mkdir()
    for file in bundle.iterdir():
        (tiled / file.name).write_bytes(file.read_bytes())
    info = json.loads((tiled / "model.json").read_text())
    (tiled / "model.json").write_text(json.dumps({**info, "tile_size": 96, "tile_overlap": 32}))
    detector = Detector(tiled, "cpu")
    image = np.random.default_rng(1).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    det = detector.detect(image, 0.0)
    assert 0 < len(det) <= detector.info.detections_per_img
    assert (det.boxes[:, 2] <= 150).all() and (det.boxes[:, 3] <= 100).all()
    assert (np.diff(det.scores) <= 0).all()

    (tiled / "model.json").write_text(json.dumps({**info, "tile_size": 96, "tile_overlap": 96}))
    with pytest.raises(BundleError, match="tile_overlap"):
        Detector(tiled, "cpu")


def test_mask_rcnn_masks_are_cropped_to_their_inclusive_boxes(shared_bundle):
    detector = Detector(shared_bundle(["cell", "debris"], **MASK_BUNDLE), "cpu")
    assert detector.has_masks
    image = np.random.default_rng(2).integers(0, 255, (48, 72, 3), dtype=np.uint8)
    det = detector.detect(image, threshold=0.0)
    assert len(det) > 0 and len(det.masks) == len(det.mask_boxes) == len(det)
    for mask, (x0, y0, x1, y1), box in zip(det.masks, det.mask_boxes, det.boxes, strict=True):
        assert mask.dtype == bool and mask.shape == (y1 - y0 + 1, x1 - x0 + 1)
        assert 0 <= x0 <= x1 < 72 and 0 <= y0 <= y1 < 48
        assert x0 <= box[0] + 1 and box[2] <= x1 + 1
