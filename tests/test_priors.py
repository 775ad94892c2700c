"""Anchors in the model and the bundle: the records' facts match torchvision, fitted anchors survive the
bundle into the runtime, old bundles serve as before, pretrained heads still load, retraining and
--resume keep a run's anchors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import get_model

from serverless.architectures import ARCHITECTURES, build_model
from serverless.bundle import BundleError, BundleInfo, load_info, save_bundle
from serverless.detector import Detector
from trainer.data.records import DetectionData, ImageRecord, Shape
from trainer.data.splits import Split, SplitOptions
from trainer.training import weights
from trainer.training.config import TrainConfig
from trainer.training.run import choose_sizing

ROOT = Path(__file__).resolve().parents[1]
MOBILE = "fasterrcnn_mobilenet_v3_large_fpn"
FITTED = {"sizes": [[20.0, 28.3, 40.0, 56.6, 80.0]] * 3, "aspect_ratios": [[0.8, 1.0, 1.25]] * 3}


def _generator(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    return getattr(model, "rpn", model).anchor_generator


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_records_state_torchvisions_own_priors_and_strides(arch):
    spec = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = get_model(arch, weights=None, weights_backbone=None, num_classes=2).eval()
    generator = _generator(model, arch)
    if spec.priors.layout == "none":  # FCOS: one anchor per cell, the size of its stride
        assert generator.sizes == tuple((s,) for s in spec.priors.strides)
    elif spec.priors.layout == "ssd":
        assert generator.scales == list(spec.priors.sizes[0])
        assert generator.aspect_ratios == [list(r) for r in spec.priors.aspect_ratios]
    else:
        assert generator.sizes == spec.priors.sizes
        assert generator.aspect_ratios == spec.priors.aspect_ratios
    side = 320 if spec.fixed_size else 512  # SSDlite's strides are stated at its 320 px input
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, side, side))
    maps = [f.shape[-1] for f in (features.values() if isinstance(features, dict) else features)]
    assert [round(side / m) for m in maps] == list(spec.priors.strides)


def _fixed_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)


def test_a_bundle_with_fitted_anchors_serves_the_same_model_without_trainer(tmp_path):
    torch.manual_seed(0)
    model = build_model(MOBILE, 2, min_size=96, anchors=FITTED)
    save_bundle(tmp_path, BundleInfo(MOBILE, ["a", "b"], min_size=96, anchors=FITTED), model.state_dict())
    assert json.loads((tmp_path / "model.json").read_text())["anchors"] == FITTED
    code = (
        "import json, sys, numpy as np\n"
        "from serverless.detector import Detector\n"
        f"d = Detector({str(tmp_path)!r}, 'cpu')\n"
        "image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)\n"
        "found = d.detect(image, threshold=0.0)\n"
        "assert not [m for m in sys.modules if m == 'trainer' or m.startswith('trainer.')]\n"
        "cells = [c.tolist() for c in d.model.rpn.anchor_generator.cell_anchors]\n"
        "print(json.dumps({'boxes': found.boxes.tolist(), 'cells': cells}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["boxes"]  # an untrained network still proposes boxes: there is something to compare
    # torchvision's base anchors of size s and ratio r: w = s / sqrt(r), h = s * sqrt(r), rounded
    s, r = 20.0, 0.8
    w, h = s / math.sqrt(r), s * math.sqrt(r)
    assert served["cells"][0][0] == [round(-w / 2), round(-h / 2), round(w / 2), round(h / 2)]
    assert len(served["cells"][0]) == 15  # 5 sizes x 3 ratios, as the pretrained RPN head expects
    reference = torchvision_model_with(FITTED, model.state_dict())
    with torch.no_grad():
        expected = reference([torch.from_numpy(_fixed_image()).permute(2, 0, 1).float() / 255])[0]
    expected = expected["boxes"][expected["scores"] > 0.0]  # what the detector keeps at threshold 0
    np.testing.assert_allclose(np.array(served["boxes"]).reshape(-1, 4), expected.numpy(), atol=1e-3)


def torchvision_model_with(anchors: dict, state: dict) -> torch.nn.Module:
    """The MobileNet R-CNN built with torchvision's own constructor and anchor generator."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.models.mobilenetv3 import mobilenet_v3_large

    backbone = _mobilenet_extractor(mobilenet_v3_large(norm_layer=torch.nn.BatchNorm2d), True, 6)
    sizes, ratios = (tuple(map(tuple, anchors[key])) for key in ("sizes", "aspect_ratios"))
    generator = AnchorGenerator(sizes, ratios)
    model = FasterRCNN(backbone, 3, rpn_anchor_generator=generator, min_size=96, max_size=1333,
                       rpn_score_thresh=0.05, box_detections_per_img=300)
    model.load_state_dict(state)
    return model.eval()


def test_an_old_bundle_without_anchors_loads_and_serves_as_before(tmp_path):
    """model.json as the trainer wrote it before anchors were stored: torchvision's own anchors."""
    torch.manual_seed(0)
    reference = get_model(MOBILE, weights=None, weights_backbone=None, num_classes=3, min_size=96,
                          box_detections_per_img=300).eval()
    old = {"format": "cvat-detector-bundle", "format_version": 1, "architecture": MOBILE,
           "labels": ["a", "b"], "shape_type": "rectangle", "min_size": 96, "max_size": None,
           "detections_per_img": 300, "tile_size": None, "tile_overlap": 128, "threshold": 0.0,
           "class_thresholds": {}, "provenance": {}, "metrics": {}}
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.json").write_text(json.dumps(old))
    detector = Detector(tmp_path, "cpu")
    assert detector.info.anchors is None
    assert detector.model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 3
    found = detector.detect(_fixed_image(), threshold=0.0)
    assert len(found)
    with torch.no_grad():
        expected = reference([torch.from_numpy(_fixed_image()).permute(2, 0, 1).float() / 255])[0]
    np.testing.assert_allclose(found.boxes, expected["boxes"].numpy(), atol=1e-3)


@pytest.mark.parametrize(
    ("anchors", "message"),
    [({"sizes": [[20.0, 40.0]] * 3, "aspect_ratios": [[1.0, 1.0, 1.0]] * 3}, "values per level"),
     ({"sizes": [[1, 2, 3, 4, 5]] * 2, "aspect_ratios": [[1, 1, 1]] * 2}, "expected 3 entries"),
     ({"scales": [0.1] * 7, "aspect_ratios": [[2, 3]] * 6}, "expected a mapping with the keys"),
     ({"sizes": [[-1, 2, 3, 4, 5]] * 3, "aspect_ratios": [[1, 1, 1]] * 3}, "expected positive numbers"),
     ("20,40", "expected a mapping")],
)
def test_malformed_anchors_in_model_json_are_a_bundle_error(tmp_path, anchors, message):
    info = json.loads(BundleInfo(MOBILE, ["a"]).to_json())
    (tmp_path / "model.json").write_text(json.dumps({**info, "anchors": anchors}))
    with pytest.raises(BundleError, match=f"model.json: anchors: .*{message}"):
        load_info(tmp_path)


def test_pretrained_weights_load_into_a_model_with_fitted_anchors():
    """Same anchors per location: every tensor of a default-anchor checkpoint (COCO's) fits, the
    RPN head included."""
    torch.manual_seed(0)
    pretrained = build_model(MOBILE, 2, min_size=96).state_dict()
    point = weights.StartingPoint("file", "coco-like.pt", state_dict=pretrained)
    model = weights.build_from(point, MOBILE, ["a", "b"], min_size=96, anchors=FITTED)
    assert _generator(model, MOBILE).sizes == tuple(map(tuple, FITTED["sizes"]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, pretrained[key]), key


def _data() -> tuple[DetectionData, Split]:
    shapes = [Shape("dot", "rectangle", box) for box in ((10.0, 10.0, 16.0, 16.0), (50.0, 50.0, 60.0, 60.0))]
    records = [ImageRecord("Train", f"{i}.png", 320, 240, None, list(shapes)) for i in range(4)]
    return DetectionData(["dot"], records), Split(SplitOptions(), {"train": records})


def test_retraining_keeps_the_parent_runs_anchors_and_scale(tmp_path):
    parent = BundleInfo(MOBILE, ["dot"], min_size=480, max_size=800, anchors=FITTED)
    save_bundle(tmp_path, parent, build_model(MOBILE, 1, anchors=FITTED).state_dict())
    point = weights.resolve(str(tmp_path), MOBILE)
    data, split = _data()
    config = TrainConfig(arch=MOBILE, weights=str(tmp_path))
    sizing = choose_sizing(config, ARCHITECTURES[MOBILE], data, split, point)
    assert (sizing.image_size, sizing.max_size, sizing.anchors) == (480, 800, FITTED)
    assert sizing.how["anchors"] == "from the parent run"
    refit = choose_sizing(TrainConfig(arch=MOBILE, anchors="default", image_size=320), ARCHITECTURES[MOBILE],
                          data, split, point)
    assert (refit.image_size, refit.anchors) == (320, None)


def test_resume_rebuilds_the_checkpoints_sizing_whatever_the_options(tmp_path):
    data, split = _data()
    recorded = {"image_size": 288, "max_size": 600, "anchors": FITTED}
    (tmp_path / "checkpoints").mkdir()
    torch.save({"sizing": recorded}, tmp_path / "checkpoints" / "last.pt")
    config = TrainConfig(arch=MOBILE, out=str(tmp_path), resume=True, image_size=640, anchors="default")
    sizing = choose_sizing(config, ARCHITECTURES[MOBILE], data, split, weights.StartingPoint("none"))
    assert sizing.recorded() == recorded
    torch.save({"model": {}}, tmp_path / "checkpoints" / "last.pt")  # written before sizes were recorded
    sizing = choose_sizing(config, ARCHITECTURES[MOBILE], data, split, weights.StartingPoint("none"))
    assert sizing.recorded() == {"image_size": 640, "max_size": 1333, "anchors": None}
