"""The shared Detector: its public API, sliced inference on large frames, out-of-memory retries."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from serverless.bundle import BundleError
from serverless.detector import Detections, Detector
from serverless.tiling import tile_windows
from tests.factories import make_bundle


class BrightBlobs(torch.nn.Module):
    """Stands in for a detector: one 'cell' box (and mask) around the bright pixels of each input.

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
            on = image[0] > 0.9
            if self.max_side and max(w, h) > self.max_side:
                on = torch.zeros_like(on)
            ys, xs = torch.nonzero(on, as_tuple=True)
            n = int(len(xs) > 0)
            box = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]] if n else []
            outputs.append({
                "boxes": torch.tensor(box, dtype=torch.float32).reshape(n, 4),
                "scores": torch.full((n,), 0.9),
                "labels": torch.ones(n, dtype=torch.int64),
                "masks": on[None, None].float()[:n],
            })  # fmt: skip
        return outputs


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(
        tmp_path_factory.mktemp("bundle"), ["cell", "debris"], min_size=96, max_size=128
    )


def _tiled(bundle: Path, model: torch.nn.Module, tile: int = 128, overlap: int = 48) -> Detector:
    detector = Detector(bundle, "cpu")
    detector.info.tile_size, detector.info.tile_overlap = tile, overlap
    detector.model = model
    return detector


def _scene(*boxes: tuple[int, int, int, int], w: int = 300, h: int = 200) -> np.ndarray:
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        frame[y0:y1, x0:x1] = 255
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_out_of_memory_falls_back_to_the_cpu(bundle):
    detector = Detector(bundle, "cuda")
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    expected = Detector(bundle, "cpu").detect(image, 0.0)
    detector.model = BrightBlobs(oom_pixels=1)
    det = detector.detect(image, 0.0)
    assert det.labels == expected.labels
    np.testing.assert_allclose(det.boxes, expected.boxes, atol=1e-3)


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


def test_mask_rcnn_masks_are_cropped_to_their_inclusive_boxes(tmp_path):
    bundle = make_bundle(
        tmp_path / "mask", ["cell"], arch="maskrcnn_resnet50_fpn_v2", min_size=64, max_size=96,
        detections_per_img=5,
    )  # fmt: skip
    detector = Detector(bundle, "cpu")
    assert detector.has_masks
    det = detector.detect(np.random.default_rng(2).integers(0, 255, (48, 72, 3), dtype=np.uint8))
    assert len(det) > 0 and len(det.masks) == len(det.mask_boxes) == len(det)
    for mask, (x0, y0, x1, y1), box in zip(det.masks, det.mask_boxes, det.boxes, strict=True):
        assert mask.dtype == bool and mask.shape == (y1 - y0 + 1, x1 - x0 + 1)
        assert 0 <= x0 <= x1 < 72 and 0 <= y0 <= y1 < 48
        assert x0 <= box[0] + 1 and box[2] <= x1 + 1
