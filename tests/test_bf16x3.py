"""bf16x3: f32-grade convolutions from bf16 products, with everything else kept f32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serverless.bf16x3 import BF16_SUFFIX, _plugin_stable, bf16_leaks, bf16_parts, bf16x3_model, cpu_has_amx
from serverless.engine import cpu_computes_bf16

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")
ops8 = pytest.importorskip("openvino.opset8")


def _graph() -> ov.Model:
    """A small detector-shaped graph with every op the CPU plugin rebuilds: Unsqueeze, Interpolate-11
    (linear and nearest), the Gather of the batch's one image, Pad-12, MaxPool-8, fully connected
    MatMuls (both weight layouts), Squeeze."""
    rng = np.random.default_rng(0)
    image = ops.parameter([3, 40, 56], np.float32, name="image")
    x = ops.unsqueeze(image, ops.constant(np.array([0], np.int64)))
    x = ops.interpolate(x, ops.constant(np.array([1, 3, 48, 64], np.int64)), "linear_onnx", "sizes",
                        coordinate_transformation_mode="half_pixel")  # fmt: skip
    x = ops.gather(x, ops.constant(np.int64(0)), ops.constant(np.int64(0)))  # images[0]
    x = ops.pad(x, np.array([0, 0, 0], np.int64), np.array([0, 1, 1], np.int64), "constant", np.float32(0))
    x = ops.unsqueeze(x, ops.constant(np.array([0], np.int64)))
    x = ops.relu(ops.convolution(x, ops.constant(rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)),
                                 [1, 1], [1, 1], [1, 1], [1, 1]))  # fmt: skip
    x = ops8.max_pool(x, [2, 2], [1, 1], [0, 0], [0, 0], [2, 2]).output(0)
    small = ops.convolution(x, ops.constant(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32)),
                            [1, 1], [1, 1], [1, 1], [1, 1])  # fmt: skip
    nearest = ops.interpolate(small, ops.shape_of(x, "i64"), "nearest", "sizes",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # fmt: skip
    x = ops.add(x, nearest)
    rois = ops.reshape(x, ops.constant(np.array([-1, 24 * 32], np.int64)), False)  # 16 rows, as RoIs
    hidden = ops.relu(ops.matmul(rois, ops.constant(rng.normal(0, 0.05, (24, 24 * 32)).astype(np.float32)),
                                 False, True))  # fmt: skip
    scores = ops.matmul(hidden, ops.constant(rng.normal(0, 0.2, (24, 5)).astype(np.float32)), False, False)
    out = ops.squeeze(ops.unsqueeze(scores, ops.constant(np.array([2], np.int64))),
                      ops.constant(np.array([2], np.int64)))  # fmt: skip
    return ov.Model([out], [image])


def _run(model: ov.Model, hint: str) -> np.ndarray:
    image = np.random.default_rng(1).uniform(0, 255, (3, 40, 56)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 1}
    return ov.Core().compile_model(model, "CPU", config)({0: image})[0]


def _error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_the_ops_the_plugin_rebuilds_are_rewritten_to_the_same_result():
    model = _graph()
    rewritten = model.clone()
    _plugin_stable(rewritten)
    kinds = {(op.get_type_name(), op.get_type_info().version_id) for op in rewritten.get_ops()}
    assert not {k for k in kinds if k[0] in ("Squeeze", "Unsqueeze", "MatMul")}
    assert ("Interpolate", "opset11") not in kinds and ("MaxPool", "opset8") not in kinds
    assert ("Pad", "opset12") not in kinds
    gathers = [op for op in rewritten.get_ops() if op.get_type_name() == "Gather"]
    assert all(op.get_output_element_type(0).get_type_name() == "i64" for op in gathers)  # shapes only
    assert _error(_run(rewritten, "f32"), _run(model, "f32")) < 1e-6


def test_bf16x3_keeps_f32_accuracy_where_plain_bf16_does_not():
    model = _graph()
    ref = _run(model, "f32")
    x3 = bf16x3_model(ov.Core(), model)
    parts = [op for op in x3.get_ops() if op.get_friendly_name().endswith(BF16_SUFFIX)]
    assert len(parts) == 3 * 2  # the two 3x3 convolutions; the fully connected ones stay f32
    assert _error(_run(x3, "bf16"), ref) < 2e-5
    if cpu_computes_bf16():  # elsewhere OpenVINO computes everything in f32 and the two agree
        assert _error(_run(model, "bf16"), ref) > 1e-3


def test_the_convolutions_really_compute_in_bf16_on_an_amx_cpu():
    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX: OpenVINO computes bf16x3 in f32")
    config = {"INFERENCE_PRECISION_HINT": "bf16"}
    compiled = ov.Core().compile_model(bf16x3_model(ov.Core(), _graph()), "CPU", config)
    runtime = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        for name in info["originalLayersNames"].astype(str).split(","):
            runtime[name] = info["runtimePrecision"].astype(str)
    precisions = {p for name, p in runtime.items() if name.endswith(BF16_SUFFIX)}
    assert precisions == {"bf16"}


def test_leaks_name_each_layer_but_the_bf16x3_convolutions_that_computes_in_bf16():
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}
    model = _graph()
    assert bf16_leaks(ov.Core().compile_model(bf16x3_model(ov.Core(), model), "CPU", config)) == []
    plain = bf16_leaks(ov.Core().compile_model(model, "CPU", config))
    if not cpu_computes_bf16():  # OpenVINO computes everything in f32 here
        assert plain == []
        return
    kinds = {leak.split()[0] for leak in plain}
    assert {"Convolution", "FullyConnected", "Interpolate", "Pooling"} <= kinds


def test_bf16_parts_add_up_to_the_weights_within_f32_rounding():
    w = np.random.default_rng(2).normal(0, 1, 10_000).astype(np.float32)
    head, tail = bf16_parts(w)
    for part in (head, tail):
        assert not (part.view(np.uint32) & 0xFFFF).any()  # exactly representable in bf16
    assert np.abs(head - w).max() <= np.abs(w).max() * 2**-8
    assert np.abs(head + tail - w).max() <= np.abs(w).max() * 2**-16


def test_amx_is_read_from_the_cpu_flags(tmp_path: Path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_amx(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_amx(flags)
    assert not cpu_has_amx(tmp_path / "missing")
