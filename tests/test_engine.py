"""The CPU engine: an OpenVINO export that finds what PyTorch finds, served without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from serverless.bf16x3 import bf16_leaks, cpu_has_amx
from serverless.bundle import ENGINE_BIN, ENGINE_JSON, ENGINE_XML, WEIGHTS, BundleError
from serverless.detector import Detector
from serverless.engine import (
    ENGINE_FORMAT_VERSION,
    THREADS_ENV,
    EngineDetector,
    EngineInfo,
    OpenVinoNetwork,
    _cgroup_quota,
    cpu_computes_bf16,
    cpu_threads,
    gemm_bias_apart,
    open_detector,
    paste_mask,
    resized_size,
)
from serverless.errors import UserError
from serverless.tiling import inclusive_box
from tests.conftest import module_dir
from tests.factories import make_bundle
from trainer.deploy import export
from trainer.deploy.export import (
    BF16,
    EngineUnfaithful,
    as_outputs,
    compare,
    export_engine,
    generated_frames,
    validation_frames,
    verify_bf16,
)

ov = pytest.importorskip("openvino")

#: Verification frames: small, and one of them at a size where float32 resize arithmetic is off.
FRAMES = generated_frames(((160, 120), (301, 100), (90, 160)), seed=1)


@pytest.fixture(scope="module")
def exported(request) -> Iterator[Path]:
    """A tiny MobileNet bundle and its verified export (the expensive part, done once)."""
    with module_dir(request, "engine") as folder:
        bundle = make_bundle(folder, ["cell", "debris"], min_size=128, max_size=192, threshold=0.05,
                             detections_per_img=50, feature_gain=1e8)  # fmt: skip
        export_engine(bundle, FRAMES, threads=2)
        yield bundle


def _copy(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


@pytest.mark.parametrize("width, height", [(640, 480), (1001, 333), (4000, 3000), (1268, 413), (333, 1001),
                                           (1920, 1080), (90, 7000), (801, 799)])  # fmt: skip
@pytest.mark.parametrize("min_size, max_size", [(800, 1333), (128, 192), (256, 256)])
def test_resized_size_is_the_size_eager_torchvision_resizes_to(width, height, min_size, max_size):
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    resized, _ = transform.resize(torch.zeros(3, height, width))
    info = EngineInfo("", min_size, max_size, fixed_size=False, masks=False)
    assert resized_size(height, width, info) == tuple(resized.shape[-2:])


def test_paste_mask_binarises_what_torchvision_pastes():
    rng = np.random.default_rng(0)
    h, w = 120, 160
    for _ in range(200):
        probs = rng.random((28, 28)).astype(np.float32)
        x0, y0 = rng.uniform(-5, w), rng.uniform(-5, h)
        box = np.array([x0, y0, x0 + rng.uniform(0.3, 90), y0 + rng.uniform(0.3, 70)], np.float32)
        box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
        full = paste_masks_in_image(torch.from_numpy(probs)[None, None], torch.from_numpy(box)[None], (h, w))
        crop = inclusive_box(box, (0, 0, w, h))
        expected = full[0, 0, crop[1] : crop[3] + 1, crop[0] : crop[2] + 1].numpy() >= 0.5
        np.testing.assert_array_equal(paste_mask(probs, box, crop, (h, w)), expected)


def test_cpu_threads_follow_the_cgroup_quota(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_quota(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path / "v1") == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(tmp_path / "v1") is None
    assert _cgroup_quota(tmp_path / "nothing") is None
    monkeypatch.delenv(THREADS_ENV, raising=False)  # the suite sets it to each worker's share
    monkeypatch.setattr("serverless.engine._cgroup_quota", lambda: 1.5)
    assert cpu_threads() == 1  # a quota of 1.5 CPUs: two threads would be throttled
    monkeypatch.setenv(THREADS_ENV, "3")
    assert cpu_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(UserError, match=THREADS_ENV):
        cpu_threads()


def test_fully_connected_bias_added_apart_is_the_same_sum_and_stays_apart_when_compiled():
    ops = pytest.importorskip("openvino.opset13")
    rng = np.random.default_rng(0)
    rois = ops.parameter([-1, 96], np.float32, name="rois")
    fc = ops.matmul(rois, ops.constant(rng.normal(0, 0.1, (32, 96)).astype(np.float32)), False, True)
    hidden = ops.relu(ops.add(fc, ops.constant(rng.normal(0, 0.1, 32).astype(np.float32))), name="relu")
    scores = ops.matmul(hidden, ops.constant(rng.normal(0, 0.1, (32, 5)).astype(np.float32)), False, False)
    model = ov.Model([scores], [rois])
    x = rng.normal(0, 1, (7, 96)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    fused = ov.Core().compile_model(model, "CPU", config)
    apart = ov.Core().compile_model(gemm_bias_apart(model.clone()), "CPU", config)
    np.testing.assert_allclose(apart({0: x})[0], fused({0: x})[0], rtol=1e-5, atol=1e-6)

    def relu_in_fully_connected(compiled: Any) -> bool:
        runtime = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
        layers = [(i["layerType"].astype(str), i["originalLayersNames"].astype(str)) for i in runtime]
        return any(kind == "FullyConnected" and "relu" in names for kind, names in layers)

    assert relu_in_fully_connected(fused)  # the plugin fuses bias and ReLU into the layer...
    assert not relu_in_fully_connected(apart)  # ...unless the bias is added apart


def test_each_resized_size_of_a_window_shape_gets_its_own_compiled_graph(exported):
    _, frame = FRAMES[0]  # 120x160
    shared = OpenVinoNetwork(exported / ENGINE_XML, 2)
    for size in ((128, 170), (96, 128), (128, 170)):
        alone = OpenVinoNetwork(exported / ENGINE_XML, 2)(frame, size)
        for got, expected in zip(shared(frame, size), alone, strict=True):
            np.testing.assert_array_equal(got, expected)
    assert len(shared._requests) == 2


def test_engine_finds_what_pytorch_finds_on_frames_it_was_not_verified_on(exported):
    engine, pytorch = EngineDetector(exported, threads=2), Detector(exported, "cpu")
    assert engine.labels == pytorch.labels and engine.engine.verification["agreement"]["missing"] == 0
    for _, frame in generated_frames(((200, 150), (97, 203), (257, 31)), seed=7):
        for threshold in (None, 0.3):
            got, expected = engine.detect(frame, threshold), pytorch.detect(frame, threshold)
            assert got.labels == expected.labels and len(got) > 0
            np.testing.assert_allclose(got.boxes, expected.boxes, atol=1.0)
            np.testing.assert_allclose(got.scores, expected.scores, atol=1e-3)


def test_export_that_differs_from_pytorch_is_refused_and_leaves_nothing(exported, tmp_path, monkeypatch):
    bundle = _copy(exported, tmp_path / "bundle")
    for name in (ENGINE_JSON, ENGINE_XML, ENGINE_BIN):
        (bundle / name).unlink()
    original = export.OpenVinoNetwork.__call__

    def shifted(self, window, size):  # an engine whose boxes are 2 px off
        boxes, *rest = original(self, window, size)
        return [boxes + 2, *rest]

    monkeypatch.setattr(export.OpenVinoNetwork, "__call__", shifted)
    with pytest.raises(EngineUnfaithful, match=r"differs from PyTorch: \d+ detections on 3 frames: [1-9]"):
        export_engine(bundle, FRAMES, threads=2)
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in exported.iterdir()
                                                              if not p.name.startswith("engine."))


def test_engine_of_other_weights_or_format_is_refused(exported, tmp_path):
    bundle = _copy(exported, tmp_path / "bundle")
    weights = bundle / WEIGHTS
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="exported from other weights"):
        EngineDetector(bundle)
    meta = json.loads((exported / ENGINE_JSON).read_text())
    (bundle / ENGINE_JSON).write_text(json.dumps({**meta, "format_version": ENGINE_FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="engine format version"):
        EngineDetector(bundle)


def test_compare_counts_missing_extra_and_tolerates_wobbles_at_the_threshold():
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32),
           "scores": np.array([0.9, 0.5004, 0.7], np.float32), "labels": np.array([1, 1, 2])}
    got = {"boxes": np.array([[0.5, 0, 10, 10.9], [20, 20, 40, 40], [70, 70, 80, 80]], np.float32),
           "scores": np.array([0.9005, 0.4998, 0.8], np.float32), "labels": np.array([1, 1, 2])}  # fmt: skip
    result = compare(ref, got, np.array([0.5, 0.5], np.float32))
    assert (result.reference, result.missing, result.extra) == (3, 1, 1)  # the class-2 boxes differ
    assert result.worst_box_px == pytest.approx(0.9) and result.worst_score == pytest.approx(6e-4, abs=1e-5)
    assert not result.same


def test_serving_the_engine_never_imports_torch(exported):
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "import numpy as np\n"
        "from serverless.engine import EngineDetector\n"
        f"detector = EngineDetector({str(exported)!r}, threads=1)\n"
        "detector.warmup()\n"
        "print(len(detector.detect(np.full((90, 120, 3), 128, np.uint8), 0.0)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 0


def _frame_folder(folder: Path) -> Path:
    """Two generated frames as PNG files, of sizes the export was not verified on."""
    from PIL import Image

    folder.mkdir()
    for name, frame in generated_frames(((200, 150), (97, 203)), seed=3):
        Image.fromarray(frame).save(folder / f"{name.split()[-1]}.png")
    return folder


def test_predict_with_the_engine_writes_what_pytorch_writes(exported, tmp_path):
    from trainer.commands import main

    images = _frame_folder(tmp_path / "images")
    results = {}
    for engine in ("pytorch", "openvino"):
        out = tmp_path / f"{engine}.json"
        args = ["predict", str(exported), "--images", str(images), "--out", str(out), "--threshold", "0.2"]
        assert main([*args, "--device", "cpu", "--engine", engine]) == 0
        results[engine] = json.loads(out.read_text())["annotations"]
    categories = {engine: [a["category_id"] for a in found] for engine, found in results.items()}
    assert categories["openvino"] == categories["pytorch"]
    for got, want in zip(results["openvino"], results["pytorch"], strict=True):
        np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1.0)
        assert abs(got["score"] - want["score"]) <= 1e-3
    on_gpu = ["--engine", "openvino", "--device", "cuda", "--out", str(tmp_path / "x.json")]
    assert main(["predict", str(exported), "--images", str(images), *on_gpu]) == 2


def test_verification_frames_are_the_images_the_run_held_out(tmp_path):
    """model.json records the run's data and split; the images CVAT put in the Validation subset
    (the zip's images/Validation/ folder) are the ones the export is verified on."""
    export_zip = Path(__file__).parent / "data" / "bccd_subset" / "cvat_for_images_1.1.zip"
    run = make_bundle(tmp_path / "run", ["RBC", "WBC", "Platelets"])
    meta = json.loads((run / "model.json").read_text())
    meta["provenance"] = {"data": {"sources": [str(export_zip)]}, "split_options": {"val_fraction": 0.2}}
    (run / "model.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(export_zip) as z:
        held_out = sorted(Path(n).name for n in z.namelist() if n.startswith("images/Validation/"))
    frames = validation_frames(run)
    assert sorted(name.split()[-1] for name, _ in frames) == held_out and len(held_out) == 4
    assert all(frame.shape == (480, 640, 3) and frame.dtype == np.uint8 for _, frame in frames)
    meta["provenance"]["data"]["sources"] = [str(tmp_path / "moved.zip")]  # not readable here
    (run / "model.json").write_text(json.dumps(meta))
    assert validation_frames(run) == []


def test_cpu_package_serves_the_engine_and_says_what_it_was_verified_on(exported, tmp_path, capsys):
    from trainer.commands import main

    run = _copy(exported, tmp_path / "run")  # package records its bf16x3 check in the run's engine.json
    assert main(["package", str(run), "--out", str(tmp_path / "fn"), "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU, OpenVINO" in out and "note:" not in out
    verified = next(line for line in out.splitlines() if line.startswith("OpenVINO export verified"))
    assert "generated 160x120" in verified and "0 missing, 0 extra" in verified
    assert "engine.xml" in out and "weights.pt" not in out


def test_crop_with_the_engine_cuts_what_pytorch_cuts(exported, tmp_path):
    import csv

    from trainer.commands import main

    images = _frame_folder(tmp_path / "images")
    rows = {}
    for engine in ("pytorch", "openvino"):
        out = tmp_path / engine
        args = ["--model", str(exported), "--images", str(images), "--out", str(out), "--threshold", "0.2"]
        assert main(["crop", *args, "--device", "cpu", "--engine", engine]) == 0
        with (out / "metadata.csv").open(newline="", encoding="utf-8") as fh:
            rows[engine] = sorted(csv.DictReader(fh), key=lambda r: (r["source_image"], -float(r["score"])))
    assert len(rows["openvino"]) == len(rows["pytorch"]) > 0
    for got, want in zip(rows["openvino"], rows["pytorch"], strict=True):
        assert (got["source_image"], got["label"]) == (want["source_image"], want["label"])
        assert all(abs(int(got[k]) - int(want[k])) <= 1 for k in ("x1", "y1", "x2", "y2"))


def test_bf16_tolerance_forgives_small_moves_but_not_a_detection_across_the_threshold():
    floors = np.array([0.5])
    ref = {"boxes": np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32),
           "scores": np.array([0.9, 0.52], np.float32), "labels": np.array([1, 1])}  # fmt: skip
    moved = {**ref, "boxes": ref["boxes"] + 2, "scores": np.array([0.86, 0.55], np.float32)}
    assert not compare(ref, moved, floors).same  # f32: 2 px and 0.04 away is another detection
    assert compare(ref, moved, floors, BF16).same
    across = {**moved, "scores": np.array([0.86, 0.49], np.float32)}  # served at 0.5: one detection less
    result = compare(ref, across, floors, BF16)
    assert (result.missing, result.extra, result.same) == (1, 0, False)


def test_bf16_is_served_only_where_its_verification_kept_the_detections(exported, tmp_path):
    bundle = _copy(exported, tmp_path / "bundle")
    assert open_detector(bundle, "cpu", "openvino", "auto").precision == "f32"
    with pytest.raises(BundleError, match="--engine-precision bf16"):
        open_detector(bundle, "cpu", "openvino", "bf16")
    with pytest.raises(UserError, match=r"'fp16': the OpenVINO engine computes in f32 \(auto, off\) or bf16"):
        open_detector(bundle, "cpu", "openvino", "fp16")
    agreement = verify_bf16(bundle, FRAMES)  # measured on this CPU, in bf16 where it has AMX/AVX512-BF16
    record = json.loads((bundle / ENGINE_JSON).read_text())["verification"]["bf16"]
    assert record["agreement"] == asdict(agreement) and record["same"] == agreement.same
    assert record["frames"] == [name for name, _ in FRAMES]
    assert record["computes_in"] == ("bf16" if cpu_computes_bf16() else "f32")
    if agreement.same:
        assert open_detector(bundle, "cpu", "openvino", "bf16").precision == "bf16"


def test_bf16x3_finds_what_f32_finds_with_no_other_layer_in_bf16(exported):
    f32, x3 = EngineDetector(exported, "f32", 2), EngineDetector(exported, "bf16x3", 2)
    for _, frame in generated_frames(((200, 150), (97, 203)), seed=7):
        got, expected = (as_outputs(d.detect(frame, 0.05), d.labels) for d in (x3, f32))
        result = compare(expected, got, np.array([0.05, 0.05], np.float32))
        assert result.reference > 0 and result.same, result.summary()
        assert result.worst_box_px < 0.05 and result.worst_score < 1e-4, result.summary()  # f32 grade
    assert x3.precision == "bf16x3"  # the compiled graph kept every other layer f32: no fallback
    compiled = next(iter(x3.network._requests.values())).get_compiled_model()
    assert bf16_leaks(compiled) == []
    if cpu_has_amx():  # elsewhere OpenVINO computes all of it in f32
        runtime = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
        assert any(i["runtimePrecision"].astype(str) == "bf16" for i in runtime)


def test_bf16x3_that_would_leak_bf16_or_cannot_be_rewritten_computes_in_f32(exported, monkeypatch, caplog):
    monkeypatch.setattr("serverless.bf16x3.bf16_leaks", lambda compiled: ["Transpose Transpose_5"])
    x3, f32 = EngineDetector(exported, "bf16x3", 2), EngineDetector(exported, "f32", 2)
    _, frame = FRAMES[0]
    got = x3.detect(frame, 0.05)
    assert x3.precision == "f32" and "computing in f32" in caplog.text and "Transpose_5" in caplog.text
    expected = f32.detect(frame, 0.05)
    np.testing.assert_array_equal(got.boxes, expected.boxes)
    np.testing.assert_array_equal(got.scores, expected.scores)

    def unknown(core: Any, model: Any) -> Any:
        raise RuntimeError("no rewrite for Einsum_7")

    monkeypatch.setattr("serverless.bf16x3.bf16x3_model", unknown)
    unrewritten = EngineDetector(exported, "bf16x3", 2)
    np.testing.assert_array_equal(unrewritten.detect(frame, 0.05).scores, expected.scores)
    assert unrewritten.precision == "f32" and "Einsum_7" in caplog.text

    monkeypatch.undo()
    compile_model = ov.Core.compile_model

    def refusing(core: Any, model: Any, device: str, config: dict[str, Any]) -> Any:
        if config["INFERENCE_PRECISION_HINT"] == "bf16":
            raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported node")
        return compile_model(core, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", refusing)
    refused = EngineDetector(exported, "bf16x3", 2)
    np.testing.assert_array_equal(refused.detect(frame, 0.05).scores, expected.scores)
    assert refused.precision == "f32" and "did not compile" in caplog.text


def test_auto_serves_bf16x3_only_where_packaging_chose_it_and_the_cpu_has_amx(exported, tmp_path,
                                                                              monkeypatch):
    bundle = _copy(exported, tmp_path / "bundle")
    meta = json.loads((bundle / ENGINE_JSON).read_text())
    amx = {"value": True}
    monkeypatch.setattr("serverless.bf16x3.cpu_has_amx", lambda: amx["value"])
    assert open_detector(bundle, "cpu", "openvino", "auto").precision == "f32"  # never checked
    for chosen in (False, True):
        meta["verification"]["bf16x3"] = {"chosen": chosen}
        (bundle / ENGINE_JSON).write_text(json.dumps(meta))
        assert open_detector(bundle, "cpu", "openvino", "auto").precision == ("bf16x3" if chosen else "f32")
    assert open_detector(bundle, "cpu", "openvino", "off").precision == "f32"
    amx["value"] = False  # three bf16 products are slower than one f32 one without AMX
    assert open_detector(bundle, "cpu", "openvino", "auto").precision == "f32"
