"""Training building blocks: exact augmentation geometry, retraining label remap, config precedence."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from serverless.architectures import build_model
from serverless.bundle import BundleInfo, save_bundle
from serverless.errors import UserError
from trainer.commands import build_parser
from trainer.commands.train import options as train_options
from trainer.training.dataset import GroupedBatchSampler
from trainer.training.transforms import RandomRot90, train_size_range
from trainer.training.weights import build_from, resolve


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_moves_boxes_with_pixels(k, monkeypatch):
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 5:15, 20:50] = 255  # a bright block: x 20..50, y 5..15
    target = {
        "boxes": tv_tensors.BoundingBoxes([[20.0, 5.0, 50.0, 15.0]], format="XYXY", canvas_size=(40, 60)),
        "masks": tv_tensors.Mask(image[:1] > 0),
    }
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: torch.tensor(k))
    out_image, out_target = RandomRot90()(tv_tensors.Image(image), target)
    ys, xs = torch.nonzero(out_image[0] > 0, as_tuple=True)
    expected = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert out_target["boxes"].tolist() == [expected]
    assert out_target["boxes"].canvas_size == tuple(out_image.shape[-2:])
    assert torch.equal(out_target["masks"][0], out_image[0] > 0)


def test_train_sizes_span_the_jitter():
    assert train_size_range(512, 0.25) == (384, 416, 448, 480, 512)
    assert train_size_range(512, 0.0) == (512,)


def test_grouped_sampler_is_seeded_per_epoch_and_splits_ranks():
    ratios = [1.5, 0.7] * 10
    sampler = GroupedBatchSampler(ratios, 4, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first
    for batch in first:  # one aspect group per batch, keyed with the epoch
        assert len({ratios[i] >= 1 for i, _ in batch}) == 1 and {e for _, e in batch} == {2}
    assert sorted(i for b in first for i, _ in b) == list(range(20))
    ranks = [GroupedBatchSampler(ratios, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    shards = [[i for b in s for i, _ in b] for s in ranks]
    assert len(list(ranks[0])) == len(list(ranks[1]))
    assert not set(shards[0]) & set(shards[1])


def test_retraining_maps_class_rows_by_label_name(tmp_path):
    old_labels, new_labels = ["a", "b"], ["b", "new", "a"]
    old = build_model("fasterrcnn_mobilenet_v3_large_fpn", 2, min_size=128)
    info = BundleInfo("fasterrcnn_mobilenet_v3_large_fpn", old_labels, min_size=128)
    save_bundle(tmp_path, info, old.state_dict())
    point = resolve(str(tmp_path), "fasterrcnn_mobilenet_v3_large_fpn")
    new = build_from(point, "fasterrcnn_mobilenet_v3_large_fpn", new_labels, min_size=128)
    o, n = old.state_dict(), new.state_dict()
    cls, box = "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight"
    w_old, w_new = o[cls], n[cls]
    assert torch.equal(w_new[0], w_old[0])  # background
    assert torch.equal(w_new[1], w_old[2]) and torch.equal(w_new[3], w_old[1])  # b, a
    assert not torch.equal(w_new[2], w_old[1]) and not torch.equal(w_new[2], w_old[2])  # fresh row
    b_old, b_new = o[box], n[box]
    assert torch.equal(b_new[4:8], b_old[8:12]) and torch.equal(b_new[12:16], b_old[4:8])
    shared = "backbone.body.0.0.weight"
    assert torch.equal(n[shared], o[shared])
    assert point.parent_labels == old_labels


def test_retraining_needs_the_same_architecture(tmp_path):
    info = BundleInfo("fasterrcnn_mobilenet_v3_large_fpn", ["a"], min_size=128)
    save_bundle(tmp_path, info, info.build().state_dict())
    with pytest.raises(UserError, match="--arch fasterrcnn_mobilenet_v3_large_fpn"):
        resolve(str(tmp_path), "retinanet_resnet50_fpn_v2")


def test_weights_argument_must_name_something(tmp_path):
    with pytest.raises(UserError, match="expected coco, imagenet, none"):
        resolve(str(tmp_path / "missing"), "fasterrcnn_resnet50_fpn_v2")


def _train_config(*argv: str):
    """The TrainConfig the real ``train`` parser and --config reading make of ``argv``."""
    args = build_parser().parse_args(["train", *argv])
    return train_options(args)[1]


def test_command_line_overrides_config_file(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 7\nlr: 0.5\noptimizer: adamw\n")
    config = _train_config("--config", str(cfg), "--lr", "0.1")
    assert (config.epochs, config.lr, config.optimizer) == (7, 0.1, "adamw")


def test_a_flag_given_wins_over_the_config_file_even_at_its_default(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 7\noptimizer: adamw\nkeep_empty: true\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--epochs", "50", "--optimizer", "sgd"])
    data, config = train_options(args)
    assert (config.epochs, config.optimizer, data.keep_empty) == (50, "sgd", True)


@pytest.mark.parametrize(
    ("text", "message"),
    [("epochs: 3\nlearning_rate: 1\n", "unknown option.*learning_rate"),
     ("- a\n- b\n", "expected a mapping"),
     ("epochs: [1\n", "invalid YAML"),
     ("optimizer: adam\n", "optimizer: 'adam' is not one of sgd, adamw"),
     ("epochs: 0\n", "epochs: expected a positive integer")],
)
def test_bad_configs_fail_clearly(tmp_path, text, message):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message):
        _train_config("--config", str(cfg))


def test_pretrained_weights_that_cannot_be_fetched_give_a_clear_message(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    point = resolve("coco", "fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(UserError, match=r"could not load coco weights .*--weights none"):
        build_from(point, "fasterrcnn_mobilenet_v3_large_fpn", ["a"], min_size=128)


def test_without_validation_the_last_epoch_is_kept_whatever_its_loss(tmp_path, monkeypatch):
    """A run without a validation split keeps its last epoch (there is no evidence to prefer
    another); losses of a detector trained from scratch start well above 1, and every epoch must
    still be written as the best so far, so the run always ends with weights."""
    from types import SimpleNamespace

    from serverless.bundle import BEST_CHECKPOINT
    from trainer.training import run as run_module

    monkeypatch.setattr(run_module, "save_checkpoint", lambda run: None)
    run = SimpleNamespace(progress=run_module.Progress(), out=tmp_path, net=torch.nn.Linear(2, 1),
                          config=SimpleNamespace(epochs=3, patience=0))  # fmt: skip
    for epoch, loss in enumerate((2.5, 1.8, 2.1)):
        run_module.record_epoch(run, epoch, {"loss": loss, "lr": 0.01, "images_per_s": 1.0}, {})
    assert run.progress.best_epoch == 2 and (tmp_path / BEST_CHECKPOINT).exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("trainable_backbone_layers: abc\n", "trainable_backbone_layers: expected an integer, got 'abc'"),
     ("val_fraction: [1, 2]\n", "val_fraction: expected a number, got '1,2'"),
     ("include_unvalidated: perhaps\n", "include_unvalidated: expected true or false"),
     ("trainable_backbone_layers: 6\n", "trainable_backbone_layers: expected 0 to 5 for fasterrcnn_res")],
)  # fmt: skip
def test_a_wrong_value_in_a_config_is_one_line_naming_the_key(tmp_path, text, message):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        train_options(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert "\n" not in str(caught.value)
