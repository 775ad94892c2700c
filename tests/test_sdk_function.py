"""The bundle as a cvat-sdk auto-annotation function, driven by cvat-sdk's own ``annotate_task``.

``annotate_task`` validates the spec and every returned shape (label ids, frame 0, no preset
source, masks vs conv_mask_to_poly, label types against the task) exactly as ``cvat-cli task
auto-annotate`` does; only the task download is replaced by frames written here, and the client
records what would have been uploaded.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from cvat_sdk import models
from cvat_sdk.auto_annotation import BadFunctionError, annotate_task
from cvat_sdk.auto_annotation import driver as aa_driver
from cvat_sdk.datasets.common import MediaElement, Sample
from cvat_sdk.masks import decode_mask

from serverless.imageio import decode_image
from tests.factories import MASK_BUNDLE
from trainer.cvat.sdk_function import BundleFunction, create

LABELS = ["cell", "debris"]


class BrightObjects(torch.nn.Module):
    """Stand-in network: a 'cell' on the bright pixels (score 0.9) and a 'debris' in the top-left
    sixteenth (score 0.3), so the Detector's real post-processing runs on predictable outputs."""

    def __init__(self, masks: bool) -> None:
        super().__init__()
        self.masks = masks

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        bright = images[0].mean(0) > 0.5
        h, w = bright.shape
        ys, xs = torch.nonzero(bright, as_tuple=True)
        corner = torch.zeros_like(bright)
        corner[: h // 4, : w // 4] = True
        out = {
            "boxes": torch.tensor(
                [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [0, 0, w // 4, h // 4]],
                dtype=torch.float32,
            ),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.3]),
        }
        if self.masks:
            out["masks"] = torch.stack([bright, corner]).float()[:, None]
        return [out]


def bright_box(rgb: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(rgb.mean(axis=2) / 255 > 0.5)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def frame_files(directory: Path) -> list[Path]:
    """Frames as CVAT stores originals: an EXIF-rotated JPEG, an RGBA PNG and a 16-bit PNG."""
    rgb = np.full((60, 80, 3), 30, dtype=np.uint8)
    rgb[5:25, 45:75] = 240  # bright block in the top right of the stored pixels
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated = directory / "rotated.jpg"
    PIL.Image.fromarray(rgb).save(rotated, quality=95, exif=exif)
    rgba = np.zeros((50, 70, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[10:30, 10:40, 3] = 0  # transparent -> composited on white, so bright
    transparent = directory / "transparent.png"
    PIL.Image.fromarray(rgba, "RGBA").save(transparent)
    gray = np.full((40, 64), 4000, dtype=np.uint16)
    gray[20:35, 30:60] = 60000
    deep = directory / "deep.png"
    PIL.Image.fromarray(gray).save(deep)
    return [rotated, transparent, deep]


class FileMedia(MediaElement):
    def __init__(self, path: Path) -> None:
        self.path = path

    def load_image(self) -> PIL.Image.Image:  # as TaskDataset does: open, load, no conversion
        image = PIL.Image.open(self.path)
        image.load()
        return image


def task_label(label_id: int, name: str, type_: str = "any") -> models.Label:
    return models.Label._from_openapi_data(
        id=label_id, name=name, type=type_, attributes=[], sublabels=[], has_parent=False
    )


def run_annotate_task(monkeypatch, function, frames, labels, **kwargs) -> list:
    """cvat-sdk's annotate_task on ``frames`` (task frame = list index); returns the shapes sent."""
    dataset = SimpleNamespace(
        labels=labels,
        samples=[Sample(i, p.name, None, FileMedia(p)) for i, p in enumerate(frames)],
    )
    monkeypatch.setattr(aa_driver, "TaskDataset", lambda *a, **k: dataset)
    sent = []
    api = SimpleNamespace(
        partial_update_annotations=lambda action, task_id, patched_labeled_data_request: (
            sent.append((action, task_id, patched_labeled_data_request))
        )
    )
    client = SimpleNamespace(logger=logging.getLogger("test"), tasks=SimpleNamespace(api=api))
    annotate_task(client, 7, function, **kwargs)
    assert [(action, task_id) for action, task_id, _ in sent] == [("create", 7)]
    return sent[0][2].shapes


@pytest.fixture(scope="module")
def box_bundle(shared_bundle) -> Path:
    return shared_bundle(LABELS, threshold=0.5)


@pytest.fixture(scope="module")
def mask_bundle(shared_bundle) -> Path:
    return shared_bundle(LABELS, **MASK_BUNDLE)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    return frame_files(tmp_path_factory.mktemp("frames"))


@pytest.fixture(scope="module")
def box_function(box_bundle) -> BundleFunction:
    return create(str(box_bundle), device="cpu")


@pytest.fixture(scope="module")
def mask_function(mask_bundle) -> BundleFunction:
    return create(str(mask_bundle), device="cpu")


def canned(function: BundleFunction, masks: bool) -> BundleFunction:
    """The same loaded bundle with the stand-in network."""
    detector = copy.copy(function.detector)
    detector.model = BrightObjects(masks)
    return BundleFunction(detector)


def test_spec_is_the_bundle_labels_with_class_ids(box_function, mask_function):
    for function, shape_type in [(box_function, "rectangle"), (mask_function, "mask")]:
        spec = function.spec
        assert [(s.id, s.name, s.type) for s in spec.labels] == [
            (1, "cell", shape_type),
            (2, "debris", shape_type),
        ]


def test_boxes_match_the_nuclio_decoder_path(monkeypatch, box_function, frames):
    """Same frame file -> same boxes as the function's decode_image path (EXIF, RGBA, 16-bit)."""
    function = canned(box_function, masks=False)
    labels = [task_label(11, "cell"), task_label(12, "debris"), task_label(13, "other")]
    shapes = run_annotate_task(monkeypatch, function, frames, labels, conf_threshold=0.2)
    reference = function.detector  # the same detector, fed by the Nuclio function's decoder
    for frame, path in enumerate(frames):
        rgb = decode_image(path.read_bytes())
        expected = reference.detect(rgb, 0.2)
        got = [s for s in shapes if s.frame == frame]
        assert [s.label_id for s in got] == [11, 12]
        assert [s.type.value for s in got] == ["rectangle", "rectangle"]
        assert [s.source for s in got] == ["auto", "auto"]
        np.testing.assert_allclose([s.points for s in got], expected.boxes)
        assert got[0].points == bright_box(rgb)
        assert [s.score for s in got] == pytest.approx([0.9, 0.3])
    assert frames[0].name == "rotated.jpg" and shapes[0].points[1] > 40  # stored at y 5..25


def test_conf_threshold_and_bundle_default(monkeypatch, box_function, frames):
    function = canned(box_function, masks=False)
    labels = [task_label(1, "cell"), task_label(2, "debris")]
    default = run_annotate_task(monkeypatch, function, frames[:1], labels)  # bundle's 0.5
    assert [(s.label_id, s.score) for s in default] == [(1, pytest.approx(0.9))]
    low = run_annotate_task(monkeypatch, function, frames[:1], labels, conf_threshold=0.25)
    assert [s.label_id for s in low] == [1, 2]
    high = run_annotate_task(monkeypatch, function, frames[:1], labels, conf_threshold=0.95)
    assert high == []


def test_masks_are_cvat_masks_of_the_detected_pixels(monkeypatch, mask_function, frames):
    function = canned(mask_function, masks=True)
    labels = [task_label(5, "cell", "mask"), task_label(6, "debris", "mask")]
    shapes = run_annotate_task(monkeypatch, function, frames[1:], labels, conf_threshold=0.2)
    for frame, path in enumerate(frames[1:]):
        rgb = decode_image(path.read_bytes())
        h, w = rgb.shape[:2]
        got = [s for s in shapes if s.frame == frame]
        assert [(s.label_id, s.type.value) for s in got] == [(5, "mask"), (6, "mask")]
        bright = rgb.mean(axis=2) / 255 > 0.5
        decoded = decode_mask(got[0].points, image_width=w, image_height=h)
        np.testing.assert_array_equal(decoded, bright)


def test_conv_mask_to_poly_returns_polygons_cvat_accepts(monkeypatch, mask_function, frames):
    function = canned(mask_function, masks=True)
    labels = [task_label(5, "cell"), task_label(6, "debris")]
    shapes = run_annotate_task(
        monkeypatch, function, frames[1:2], labels, conf_threshold=0.2, conv_mask_to_poly=True
    )
    assert [(s.label_id, s.type.value) for s in shapes] == [(5, "polygon"), (6, "polygon")]
    # pixel-corner outlines: the transparent block (rows 10-29, columns 10-39), the corner block
    assert shapes[0].points == [10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]
    assert shapes[1].points == [0.0, 0.0, 17.0, 0.0, 17.0, 12.0, 0.0, 12.0]


def test_mask_function_refused_by_cvat_sdk_on_rectangle_labels(monkeypatch, mask_function, frames):
    """cvat-sdk's own check: the spec declares mask labels, so a rectangle task label is refused."""
    function = canned(mask_function, masks=True)
    with pytest.raises(BadFunctionError, match="'mask' in the function"):
        run_annotate_task(monkeypatch, function, frames[1:2], [task_label(5, "cell", "rectangle")])


def test_real_mask_network_output_passes_cvat_sdk_validation(monkeypatch, mask_function, frames):
    """The untrained Mask R-CNN itself (no stand-in): its ragged masks become valid polygons."""
    function = mask_function
    labels = [task_label(5, "cell"), task_label(6, "debris")]
    polygons = run_annotate_task(
        monkeypatch, function, frames[2:], labels, conf_threshold=0.0, conv_mask_to_poly=True
    )
    assert polygons and {s.type.value for s in polygons} == {"polygon"}
    assert all(len(s.points) >= 6 and len(s.points) % 2 == 0 for s in polygons)


def test_factory_reports_a_missing_bundle(tmp_path):
    with pytest.raises(ValueError, match=r"no model\.json"):
        create(str(tmp_path / "nothing"))
