"""Every architecture of serverless/architectures.py through the paths a user runs: one training
step with the real ``train`` command, the bundle it writes served by the Nuclio handler, and a
retraining from that run with one label dropped and two added, whose class rows follow the names.

Kept fast: 96x64 frames, 2 training images and 1 validation image, one step at 64 px, 5 detections,
50 region proposals at inference (the two-stage heads' cost grows with them), no checkpoints kept.
The architectures spread over the xdist workers (one group each).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.models.detection.rpn import RegionProposalNetwork

from serverless.architectures import ARCHITECTURES
from serverless.detector import Detector
from tests.conftest import module_dir
from tests.test_handler import call, handler_context, started_platform
from tests.test_shapes import assert_cvat_shapes
from trainer.commands import main
from trainer.data.synth import generate
from trainer.training import weights

FIRST = ("circle", "square")
SECOND = ("square", "triangle", "star")  # circle dropped; triangle and star added; square moves
TINY = ["--device", "cpu", "--epochs", "1", "--image-size", "64", "--batch-size", "2", "--workers", "0",
        "--detections-per-img", "5", "--roi-batch-size", "16", "--warmup-iters", "0", "--patience", "0"]
#: Batch-norm statistics change in any forward pass; parameters change only by training.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module", autouse=True)
def _few_proposals():
    """Inference keeps 50 region proposals instead of 1000 (training is unchanged)."""
    real = RegionProposalNetwork.post_nms_top_n
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: real(self) if self.training else 50)
        yield


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, ...], Path]:
    """Every CVAT shape kind (Mask R-CNN trains on the polygons and masks), for each label set."""
    base = tmp_path_factory.mktemp("archdata")
    return {
        labels: generate(base / labels[0], seed=3 + i, train=2, val=1, empty=0, size=(96, 64),
                         labels=labels, shapes="mixed", formats=("cvat",))["cvat"]
        for i, labels in enumerate((FIRST, SECOND))
    }


def _train(export: Path, out: Path, arch: str, start: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run ``train`` and return the state the network started from (as build_from made it)."""
    real, started = weights.build_from, []

    def recording(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = real(*args, **kwargs)
        started.append(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(weights, "build_from", recording)
    assert main(["train", str(export), "--out", str(out), "--arch", arch, "--weights", start, *TINY]) == 0
    monkeypatch.setattr(weights, "build_from", real)
    shutil.rmtree(out / "checkpoints")  # hundreds of MB for the ResNet-50 ones; never read here
    (state,) = started
    return state


@pytest.fixture(
    scope="module",
    params=[pytest.param(a, marks=pytest.mark.xdist_group(f"arch-{a}")) for a in sorted(ARCHITECTURES)],
)
def runs(request, exports) -> Iterator[dict[str, Any]]:
    """One architecture trained one step from scratch, then retrained from that run."""
    arch = request.param
    with module_dir(request, arch) as base, pytest.MonkeyPatch.context() as mp:
        first_start = _train(exports[FIRST], base / "first", arch, "none", mp)
        second_start = _train(exports[SECOND], base / "second", arch, str(base / "first"), mp)
        yield {"arch": arch, "first": base / "first", "second": base / "second",
               "first_start": first_start, "second_start": second_start}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "weights.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_one_step_writes_a_bundle_of_the_architecture(runs):
    info = json.loads((runs["first"] / "model.json").read_text())
    assert info["architecture"] == runs["arch"] and info["labels"] == list(FIRST)
    assert info["shape_type"] == ("mask" if ARCHITECTURES[runs["arch"]].masks else "rectangle")
    assert info["provenance"]["epochs_run"] == 1
    trained, start = _weights(runs["first"]), runs["first_start"]
    assert trained.keys() == start.keys()
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    moved = [k for k, v in trained.items() if not k.endswith(STATISTICS) and not torch.equal(v, start[k])]
    assert moved, "the training step changed no weight"


def _frame(export: Path) -> tuple[bytes, int, int]:
    """The validation image of an export, as the file CVAT would send."""
    with zipfile.ZipFile(export) as archive:
        name = next(n for n in archive.namelist() if n.startswith("images/Validation/"))
        data = archive.read(name)
    with Image.open(io.BytesIO(data)) as img:
        return data, *img.size


@pytest.mark.slow
def test_the_handler_serves_the_bundle(runs, exports):
    platform = started_platform(CVAT_DETECTOR_BUNDLE=str(runs["first"]))
    for module in handler_context(platform).user_data.detector.model.modules():
        if hasattr(module, "score_thresh"):  # the network's own floor: one step scores low
            module.score_thresh = 0.0
    data, width, height = _frame(exports[FIRST])
    status, shapes = call(platform, {"image": base64.b64encode(data).decode(), "threshold": 0.0})
    assert status == 200 and shapes
    assert_cvat_shapes(shapes, width, height, list(FIRST))
    assert {s["type"] for s in shapes} == {ARCHITECTURES[runs["arch"]].shape_type}


def _class_rows(key: str, tensor: torch.Tensor, classes: int) -> torch.Tensor:
    """``tensor`` as (groups, classes, per class, ...): class-dependent outputs are laid out as
    torchvision's heads read them: Fast R-CNN box deltas (N, classes * 4) -> (N, classes, 4)
    (roi_heads.py, fastrcnn_loss / box_coder.decode), dense heads' logits (N, anchors * classes,
    H, W) -> (N, anchors, classes, H, W) (retinanet.py, fcos.py, ssd.py heads), one row per class
    for Fast R-CNN scores and Mask R-CNN logits."""
    per_class = 4 if key.endswith(("bbox_pred.weight", "bbox_pred.bias")) else 1
    groups = tensor.shape[0] // (classes * per_class)
    assert groups * classes * per_class == tensor.shape[0], key
    return tensor.reshape(groups, classes, per_class, *tensor.shape[1:])


@pytest.mark.slow
def test_retraining_moves_class_rows_by_label_name(runs):
    parent, child = _weights(runs["first"]), runs["second_start"]
    # A retraining fine-tunes as torchvision's pretrained builders do (issue 11): where they freeze
    # batch norm, the child's FrozenBatchNorm2d keeps the parent's statistics but no step counter.
    parent = {k: v for k, v in parent.items() if k in child or not k.endswith("num_batches_tracked")}
    assert parent.keys() == child.keys()
    by_class = [k for k in parent if parent[k].shape != child[k].shape]  # sized by the label count
    assert by_class, "no parameter depends on the number of labels"
    for key in parent.keys() - by_class:  # everything else starts where the parent ended
        assert torch.equal(child[key], parent[key]), key
    old_class = {name: i + 1 for i, name in enumerate(FIRST)}
    for key in by_class:
        old = _class_rows(key, parent[key], len(FIRST) + 1)
        new = _class_rows(key, child[key], len(SECOND) + 1)
        assert torch.equal(new[:, 0], old[:, 0]), key  # background
        for k, name in enumerate(SECOND, start=1):
            if name in old_class:
                assert torch.equal(new[:, k], old[:, old_class[name]]), (key, name)
            elif child[key].dim() > 1:  # a fresh row (biases start from one prior for every class)
                assert not any(torch.equal(new[:, k], old[:, j]) for j in range(len(FIRST) + 1)), key
    info = json.loads((runs["second"] / "model.json").read_text())
    assert info["labels"] == list(SECOND)
    assert info["provenance"]["parent_run"] == str(runs["first"].resolve())
    assert Detector(runs["second"], "cpu").labels == list(SECOND)
