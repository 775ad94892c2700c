"""Object sizes, the input scale and the anchors fitted to the training boxes (trainer/training/anchors.py).

The truths here are hand computations: numpy-free percentiles of known size lists, torchvision's resize
rule (scale = min(min_size / short side, max_size / long side)) applied by hand, and the IoU of centred
boxes, the measure an anchor matcher uses.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from serverless.architectures import get_architecture
from serverless.errors import UserError
from trainer.commands import main
from trainer.data.records import ImageRecord, Shape
from trainer.data.synth import generate
from trainer.training import anchors
from trainer.training.config import TrainConfig

RCNN = get_architecture("fasterrcnn_resnet50_fpn_v2")
MOBILE = get_architecture("fasterrcnn_mobilenet_v3_large_fpn")
RETINA = get_architecture("retinanet_resnet50_fpn_v2")
SSD = get_architecture("ssdlite320_mobilenet_v3_large")
FCOS = get_architecture("fcos_resnet50_fpn")


def _records(boxes_by_label: dict[str, list[tuple[float, float]]], frame=(400, 300), per_image=10):
    """Images of ``frame`` size holding boxes of the given (width, height), ``per_image`` each."""
    shapes = [Shape(label, "rectangle", (0.0, 0.0, float(w), float(h)))
              for label, sizes in boxes_by_label.items() for w, h in sizes]
    return [ImageRecord("Train", f"{i}.png", *frame, None, shapes[i:i + per_image])
            for i in range(0, len(shapes), per_image)]


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, by hand."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def test_statistics_per_label_in_source_and_resized_pixels():
    # label a: squares of 1..100 px; label b: 20 px wide, 10..29 px high (shorter side 10..20)
    a = [(s, s) for s in range(1, 101)]
    b = [(20, h) for h in range(10, 30)]
    sizing = anchors.choose(RCNN, _records({"a": a, "b": b}), ["a", "b", "c"], image_size=800,
                            anchors="default")
    scale = min(800 / 300, 1333 / 400)  # the resize of a 400x300 frame to shorter side 800
    row = sizing.objects["a"]
    assert row["objects"] == 100
    assert row["short_side"] == {"min": 1.0, "median": 50.5, "p95": 95.05}
    assert row["short_side_resized"]["median"] == pytest.approx(50.5 * scale, abs=0.01)
    assert row["short_side_resized"]["p95"] == pytest.approx(95.05 * scale, abs=0.01)
    shorts_b = [min(20, h) for h in range(10, 30)]
    aspects_b = [h / 20 for h in range(10, 30)]
    assert sizing.objects["b"]["short_side"]["median"] == pytest.approx(_percentile(shorts_b, 50), abs=0.01)
    assert sizing.objects["b"]["aspect_ratio"] == {
        "min": 0.5, "median": pytest.approx(_percentile(aspects_b, 50), abs=0.01),
        "p95": pytest.approx(_percentile(aspects_b, 95), abs=0.01)}
    assert sizing.objects["c"] == {"objects": 0}
    assert sizing.scale == (pytest.approx(scale, abs=1e-3),) * 2


def test_fixed_size_architectures_stretch_each_axis():
    # SSDlite squashes a 640x320 frame into 320x320: widths halve, heights stay
    sizing = anchors.choose(SSD, _records({"a": [(40, 20)] * 4}, frame=(640, 320)), ["a"], image_size=320,
                            anchors="default")
    row = sizing.objects["a"]
    assert row["short_side"]["min"] == 20 and row["short_side_resized"]["min"] == 20
    assert row["aspect_ratio"]["min"] == 1.0  # 20 x 20 after the stretch


def test_objects_below_the_detectable_size_are_counted_and_warned_about():
    # default anchors of the ResNet-50 R-CNN start at 32 px: objects under 16 px are warned about
    small = [(s, s) for s in range(5, 25)]  # 5..24 px, at scale 1 (frame short side 300, size 300)
    sizing = anchors.choose(RCNN, _records({"dot": small}), ["dot"], image_size=300, anchors="default")
    assert sizing.detectable_px == 16
    assert sizing.objects["dot"]["below_detectable"] == 11  # 5..15
    assert sizing.warnings[0].startswith("dot: 11 of 20 objects are smaller than 16 px after the resize")
    assert "smallest anchor 32 px / 2" in sizing.warnings[-1]
    fitted = anchors.choose(RCNN, _records({"dot": small}), ["dot"], image_size=300)
    assert fitted.detectable_px == 8 and fitted.objects["dot"]["below_detectable"] == 3  # 5, 6, 7


def _best_iou(w: float, h: float, anchor_wh: list[tuple[float, float]]) -> float:
    """Best IoU of a w x h box with any anchor centred on it."""
    return max(min(w, aw) * min(h, ah) / (w * h + aw * ah - min(w, aw) * min(h, ah)) for aw, ah in anchor_wh)


def _anchor_shapes(fitted: dict, image_size: int) -> list[tuple[float, float]]:
    """torchvision's anchors of size s and ratio r = h / w: w = s / sqrt(r), h = s * sqrt(r)."""
    if "scales" in fitted:  # SSD default boxes: (s, s), (s', s') and (s sqrt(a), s / sqrt(a)) both ways
        out = []
        scales = fitted["scales"]
        for k, ratios in enumerate(fitted["aspect_ratios"]):
            s, s2 = scales[k] * image_size, math.sqrt(scales[k] * scales[k + 1]) * image_size
            out += [(s, s), (s2, s2)] + [p for a in ratios for p in ((s * a**0.5, s / a**0.5),
                                                                     (s / a**0.5, s * a**0.5))]
        return out
    return [(s / r**0.5, s * r**0.5) for level, ratios in zip(fitted["sizes"], fitted["aspect_ratios"],
                                                             strict=True) for s in level for r in ratios]


@pytest.mark.parametrize("spec", [RCNN, MOBILE, RETINA, SSD], ids=lambda s: s.name)
def test_fitted_anchors_cover_the_observed_sizes(spec):
    """Every observed size from the finest stride up has an anchor of IoU >= 0.4 with it when centred
    (the default anchors leave the small ones without, except the MobileNet's, which start at its
    32 px stride anyway and are only made denser)."""
    rng = np.random.default_rng(0)
    sides = np.exp(rng.uniform(np.log(6), np.log(150), 400))  # 6..150 px, log-uniform
    aspect = np.exp(rng.uniform(np.log(0.7), np.log(1.4), 400))
    wh = np.stack([sides / aspect**0.5, sides * aspect**0.5], axis=1)
    fitted = anchors.fit_anchors(spec, wh, 640)
    shapes = _anchor_shapes(fitted, 640)
    low, high = np.percentile(np.sqrt(wh[:, 0] * wh[:, 1]), anchors.RANGE)
    stride = spec.priors.strides[0]
    inside = [(w, h) for w, h in wh if max(low, stride) <= math.sqrt(w * h) <= high]
    fitted_ious = [_best_iou(w, h, shapes) for w, h in inside]
    default = _anchor_shapes(spec.priors.default_anchors(), 640)
    default_ious = [_best_iou(w, h, default) for w, h in inside]
    assert min(fitted_ious) >= 0.4, spec.name
    assert np.mean(fitted_ious) > np.mean(default_ious)
    if spec is not MOBILE:
        assert min(default_ious) < 0.25  # the small ones had no anchor near them: what this fixes
    assert min(math.sqrt(w * h) for w, h in shapes) >= stride - 0.5  # anchors still tile the image


def test_fitted_anchors_keep_the_count_per_location():
    wh = np.array([[8.0, 9.0], [30.0, 20.0], [120.0, 130.0]] * 10)
    for spec in (RCNN, MOBILE, RETINA, SSD):
        fitted = anchors.fit_anchors(spec, wh, 512)
        default = spec.priors.default_anchors()
        for key in default:
            assert np.shape(fitted[key]) == np.shape(default[key]), (spec.name, key)
    assert anchors.fit_anchors(FCOS, wh, 512) is None


def test_aspect_ratios_are_the_medians_of_the_observed_thirds():
    ratios = [0.5] * 10 + [1.0] * 10 + [2.0] * 10  # three clusters of height / width
    wh = np.array([(20 / r**0.5, 20 * r**0.5) for r in ratios])
    fitted = anchors.fit_anchors(RCNN, wh, 800)
    assert fitted["aspect_ratios"][0] == [0.5, 1.0, 2.0]


def test_auto_image_size_enlarges_small_objects_until_they_are_detectable():
    # 600x400 frames, 5 px dots. ResNet-50 R-CNN with fitted anchors: detectable from max(8, 4 / 2) = 8 px,
    # auto aims at twice that: 5 * size / 400 >= 16  ->  size >= 1280 (on the 32 px grid from 416)
    records = _records({"dot": [(5, 5)] * 20, "cell": [(60, 60)] * 20}, frame=(600, 400))
    sizing = anchors.choose(RCNN, records, ["dot", "cell"])
    assert sizing.image_size == 1280 and sizing.how["image_size"] == "auto"
    assert sizing.max_size == round(1280 * 1333 / 800)
    assert sizing.objects["dot"]["short_side_resized"]["min"] == 16


def test_auto_image_size_keeps_the_frames_size_for_large_objects_and_caps_tiny_ones():
    large = _records({"cell": [(80, 80)] * 10}, frame=(640, 480))
    assert anchors.choose(RCNN, large, ["cell"]).image_size == 480  # no resampling needed
    huge_frames = _records({"cell": [(80, 80)] * 10}, frame=(2400, 1800))
    assert anchors.choose(RCNN, huge_frames, ["cell"]).image_size == 800  # shrunk as by default
    tiny = _records({"dot": [(2, 2)] * 10}, frame=(640, 480))
    sizing = anchors.choose(RCNN, tiny, ["dot"])
    assert sizing.image_size == 1600  # 2x the default; 4x the 480 px frames would be 1920
    assert sizing.warnings and sizing.warnings[0].startswith("dot: 10 of 10 objects")


def test_auto_image_size_never_enlarges_frames_more_than_four_times():
    records = _records({"dot": [(2, 2)] * 10}, frame=(200, 150))
    assert anchors.choose(MOBILE, records, ["dot"]).image_size == 576  # 4 x 150, down to the 32 px grid
    records = _records({"dot": [(3, 3)] * 10}, frame=(400, 300))
    assert anchors.choose(RCNN, records, ["dot"]).image_size == 1184  # 4 x 300, down to the 32 px grid


@pytest.mark.parametrize(
    ("spec", "text", "expected"),
    [(RCNN, "8,16,32,64,128", [[8], [16], [32], [64], [128]]),
     (RETINA, "8,16,32,64,128", [[8, 10.1, 12.7], [16, 20.2, 25.4], [32, 40.3, 50.8], [64, 80.6, 101.6],
                                 [128, 161.3, 203.2]]),
     (MOBILE, "16,32,64,128,256", [[16, 32, 64, 128, 256]] * 3)],
)
def test_given_anchor_sizes(spec, text, expected):
    sizing = anchors.choose(spec, _records({"a": [(20, 20)] * 3}), ["a"], image_size=320, anchors=text)
    assert sizing.anchors["sizes"] == expected
    assert sizing.anchors["aspect_ratios"] == spec.priors.default_anchors()["aspect_ratios"]
    assert sizing.how["anchors"] == "given"


def test_given_anchor_sizes_must_match_the_levels():
    with pytest.raises(UserError, match="--anchors 8,16: fasterrcnn_resnet50_fpn_v2 takes 5 sizes"):
        anchors.choose(RCNN, _records({"a": [(20, 20)]}), ["a"], image_size=320, anchors="8,16")
    with pytest.raises(UserError, match="fcos_resnet50_fpn takes no sizes"):
        anchors.choose(FCOS, _records({"a": [(20, 20)]}), ["a"], image_size=320, anchors="8,16,32,64,128")


def test_inherited_sizing_wins_over_auto_but_not_over_given_options():
    parent = {"image_size": 640, "max_size": 1000, "anchors": {"sizes": [[9], [18], [36], [72], [144]],
                                                              "aspect_ratios": [[1.0, 1.1, 1.2]] * 5}}
    records = _records({"a": [(20, 20)] * 3})
    kept = anchors.choose(RCNN, records, ["a"], inherited=parent, source="the parent run")
    assert (kept.image_size, kept.max_size, kept.anchors) == (640, 1000, parent["anchors"])
    assert kept.how == {"image_size": "from the parent run", "anchors": "from the parent run"}
    changed = anchors.choose(RCNN, records, ["a"], image_size=512, anchors="default", inherited=parent)
    assert (changed.image_size, changed.anchors) == (512, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--image-size", "16"], "expected auto or a shorter side of at least 32 pixels"),
     (["--anchors", "8,x"], "expected auto, default or ascending sizes"),
     (["--anchors", "32,16"], "expected auto, default or ascending sizes")],
)
def test_bad_size_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "x.zip", "--out", "unused", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_size_options_parse_from_yaml_lists_and_text(tmp_path):
    from trainer.commands import build_parser
    from trainer.commands.train import options

    cfg = tmp_path / "train.yaml"
    cfg.write_text("image_size: auto\nanchors: [8, 16, 32, 64, 128]\n")
    config = options(build_parser().parse_args(["train", "--config", str(cfg)]))[1]
    assert (config.image_size, config.anchors) == ("auto", "8,16,32,64,128")
    assert TrainConfig().image_size == "auto" and TrainConfig().anchors == "auto"


def test_inspect_reports_sizes_and_warns_about_small_objects(tmp_path, capsys):
    export = generate(tmp_path, seed=4, train=6, val=2, empty=0, size=(320, 240), labels=("spore", "cell"),
                      object_sizes={"spore": (6, 10), "cell": (40, 60)}, objects=(4, 9),
                      formats=("cvat",))["cvat"]
    assert main(["inspect", str(export), "--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--image-size", "240",
                 "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)["object_sizes"]
    spore, cell = sizes["objects"]["spore"], sizes["objects"]["cell"]
    # drawn diameters 6..10 px (a rasterised disc spans its diameter +- 1 px), squares of side 40..60;
    # a particle cut by the image border keeps at least half of it
    assert 5 <= spore["short_side"]["median"] <= 11 and spore["short_side"]["p95"] <= 11
    assert 39 <= cell["short_side"]["median"] <= 61 and cell["short_side"]["p95"] <= 61
    assert spore["short_side"]["min"] >= 2 and cell["short_side"]["min"] >= 19
    assert spore["below_detectable"] == spore["objects"] and cell["below_detectable"] == 0
    assert sizes["image_size"] == 240 and sizes["how"]["image_size"] == "given"
    assert main(["inspect", str(export), "--arch", "fasterrcnn_mobilenet_v3_large_fpn"]) == 0
    out = capsys.readouterr().out
    assert "spore" in out and "resized x" in out and "(auto)" in out and "fitted to the training boxes" in out
