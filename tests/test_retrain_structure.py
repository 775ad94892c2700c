"""Retraining is the same recipe as a first fine-tune, for every architecture and every parent.

The truth is torchvision's own builder given pretrained weights (faked offline: the weight files'
URLs answer state dicts of the right shapes): its normalisation layers (FrozenBatchNorm2d in the
older builders, BatchNorm2d in the ``_v2`` ones), its frozen backbone layers, SSDlite's tail. A
parent trained from coco, imagenet or none, retrained with ``--weights RUN``, must come out with the
same module types and the same ``requires_grad`` per parameter; the function must rebuild the
network the bundle's weights belong to. Every model reports detections down to one score floor.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models import get_model, get_model_weights

from serverless.architectures import ARCHITECTURES, SCORE_FLOOR
from serverless.bundle import BundleInfo, load_model, save_bundle
from trainer.training.weights import build_from, resolve

LABELS = ["a", "b"]


@pytest.fixture
def pretrained_offline(monkeypatch):
    """torchvision's weight downloads answer fake state dicts; random init is replaced by zeros
    (values do not matter here, only structure, and init is most of a ResNet-50's build time)."""

    def zeros(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.zero_()

    for name in ("kaiming_uniform_", "kaiming_normal_", "normal_", "uniform_", "constant_",
                 "xavier_uniform_", "zeros_", "ones_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, zeros)
    files: dict[str, dict] = {}

    def fake_download(url, *args, **kwargs):
        return files[url.rsplit("/", 1)[-1]]

    def serve(arch: str) -> None:
        backbone = ARCHITECTURES[arch].backbone
        coco, imagenet = get_model_weights(arch).DEFAULT, get_model_weights(backbone).DEFAULT
        files[coco.url.rsplit("/", 1)[-1]] = get_model(
            arch, weights=None, weights_backbone=None, num_classes=91).state_dict()
        files[imagenet.url.rsplit("/", 1)[-1]] = get_model(backbone, weights=None).state_dict()

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake_download)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # builds are many small ops (SSDlite measures its widths by a forward)
    yield serve
    torch.set_num_threads(threads)


def structure(model: torch.nn.Module) -> tuple[dict, dict]:
    """Module type (and norm eps) per name; requires_grad per parameter name."""
    modules = {name: (type(m).__name__, getattr(m, "eps", None)) for name, m in model.named_modules()}
    return modules, {name: p.requires_grad for name, p in model.named_parameters()}


def first_fine_tune(arch: str, start: str, layers: int | None) -> torch.nn.Module:
    """torchvision's own pretrained build: the reference recipe."""
    spec = ARCHITECTURES[arch]
    kwargs = {} if layers is None else {"trainable_backbone_layers": layers}
    if start == "imagenet":
        enum = get_model_weights(spec.backbone).DEFAULT
        return get_model(arch, weights=None, weights_backbone=enum, num_classes=4, **kwargs)
    return get_model(arch, weights=get_model_weights(arch).DEFAULT, **kwargs)


CASES = [(arch, None) for arch in ARCHITECTURES] + [
    ("fasterrcnn_mobilenet_v3_large_fpn", 5), ("fcos_resnet50_fpn", 1), ("ssdlite320_mobilenet_v3_large", 2),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "layers"), CASES)
def test_a_retrain_has_the_first_fine_tunes_layers_for_every_parent(
    arch, layers, pretrained_offline, tmp_path
):
    pretrained_offline(arch)
    references = {start: structure(first_fine_tune(arch, start, layers)) for start in ("coco", "imagenet")}
    for start in ("coco", "imagenet", "none"):
        point = resolve(start, arch)
        parent = build_from(point, arch, LABELS, min_size=128)
        run = tmp_path / f"{arch}-{start}"
        info = BundleInfo(arch, LABELS, min_size=128, structure=point.structure)
        save_bundle(run, info, parent.state_dict())
        child = build_from(resolve(str(run), arch, layers), arch, ["b", "new", "a"], min_size=128)
        modules, grads = structure(child)
        want_modules, want_grads = references["imagenet" if start == "imagenet" else "coco"]
        assert modules == want_modules, f"{start} parent: module types differ"
        assert grads == want_grads, f"{start} parent: frozen parameters differ"
        for model in (parent, child):  # torchvision's floors are 0.2 (FCOS) to 0.001 (SSDlite)
            assert getattr(model, "roi_heads", model).score_thresh == SCORE_FLOOR == 0.001


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_fpn", "fcos_resnet50_fpn"])
def test_the_function_rebuilds_frozen_norm_bundles_old_and_new(arch, pretrained_offline, tmp_path):
    """Weights of a pretrained start carry no num_batches_tracked; the function must build
    FrozenBatchNorm2d (with its eps) for them, also from bundles that predate the structure field."""
    pretrained_offline(arch)
    point = resolve("coco", arch)
    trained = build_from(point, arch, LABELS, min_size=128)
    for name, recorded in (("new", point.structure), ("old", {})):
        save_bundle(tmp_path / name, BundleInfo(arch, LABELS, min_size=128, structure=recorded),
                    trained.state_dict())
        _, served = load_model(tmp_path / name)
        assert structure(served)[0] == structure(trained)[0], name
