"""f32-faithful convolutions from bf16 arithmetic ("bf16x3") for the OpenVINO CPU engine.

On CPUs with AMX, bf16 matrix products run many times faster than f32 ones, but a plain bf16 model
moves scores by a few hundredths. Splitting each operand into a bf16 head and a bf16 tail keeps f32
accuracy with three products accumulated in f32: x·W ≈ x_hi·W_hi + x_hi·W_lo + x_lo·W_hi (the
dropped x_lo·W_lo is about 2^-16 of the result). :func:`bf16x3_model` rewrites an exported graph so:

- every convolution with a kernel larger than 1x1 becomes those three convolutions, summed small
  terms first, so that only x_lo·W_hi is ever stored in bf16. 1x1 convolutions read wide inputs
  whose split costs more than AMX saves, and stay f32;
- everything else stays f32 under OpenVINO's bf16 inference hint, by the per-node
  ``DisablePrecisionConversion`` ("precise") mark. The CPU plugin does not copy that mark to the
  nodes it rebuilds while compiling, so those ops are first rewritten into forms it keeps
  (:func:`_plugin_stable`), and the split's subtraction is a multiply by a per-channel -1.

Because that rests on what one plugin release rebuilds, :func:`bf16_leaks` checks each compiled
graph, and the engine serves f32 where any other layer would compute in bf16. Measured on R50-FPN v2
(docs/benchmarks.md): scores within 3e-4 of PyTorch's on a trained model, 1.3-1.6x faster than the
f32 engine on an AMX CPU. Without AMX it would be three times slower, so it is only chosen where
:func:`cpu_has_amx`, and only for an engine whose packaging check found it faithful and faster.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: The /proc/cpuinfo flag of AMX bf16 tiles.
AMX_FLAG = "amx_bf16"
#: What marks a layer of the serialized graph to stay f32 under the bf16 hint (all conversions off).
KEEP_F32 = '<rt_info><attribute name="precise" version="0" value="dynamic:dynamic" /></rt_info>'
#: Name suffix of the convolutions that compute in bf16; every other layer is kept f32.
BF16_SUFFIX = "/bf16x3"
#: Name suffix of the conversions that round a convolution's input to its bf16 head.
SPLIT_SUFFIX = "/bf16x3-split"


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AMX bf16 tiles (Sapphire Rapids and newer Xeons)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(AMX_FLAG in line.split() for line in text.splitlines() if line.startswith("flags"))


def bf16x3_model(core: Any, model: Any) -> Any:
    """A copy of ``model`` (an ``openvino.Model``) to compile with ``INFERENCE_PRECISION_HINT``
    bf16 that computes its large convolutions as three bf16 products and everything else in f32."""
    model = model.clone()
    _plugin_stable(model)
    _triple_convolutions(model)
    return _keep_rest_f32(core, model)


def bf16_leaks(compiled: Any) -> list[str]:
    """Layers of a compiled bf16x3 model (``openvino.CompiledModel``) that compute or store in bf16
    but are not the bf16x3 convolutions, nor the reorders feeding them or reading their bf16 part:
    empty unless a plugin release rebuilds a node this module's rewrites did not foresee (which
    loses its f32 mark), so that such a model is never served as f32-faithful."""
    leaks = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind == "Const" or not _in_bf16(info):
            continue
        if kind == "Reorder":
            around = [i.get_node() for i in op.input_values()]
            around += [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
            if any(_is_part(n.get_rt_info()) for n in around):
                continue
        elif _is_part(info):
            continue
        leaks.append(f"{kind} {info['originalLayersNames'].astype(str) or op.get_friendly_name()}")
    return leaks


def _in_bf16(info: Any) -> bool:
    precisions = [info["runtimePrecision"].astype(str), info["outputPrecisions"].astype(str)]
    return any("bf16" in p for p in precisions)


def _is_part(info: Any) -> bool:
    """Whether a runtime layer is one of the bf16x3 convolutions (with what the plugin fused into
    it), or the rounding of an input to its bf16 head."""
    names = info["originalLayersNames"].astype(str).split(",")
    if info["layerType"].astype(str) == "Convert":
        return all(name.endswith(SPLIT_SUFFIX) for name in names)
    return info["layerType"].astype(str) == "Convolution" and names[0].endswith(BF16_SUFFIX)


def bf16_parts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head, tail): ``w`` rounded to bf16 (to nearest even) and the rest rounded to bf16, as f32."""
    head = _round_bf16(w.astype(np.float32))
    return head, _round_bf16(w - head)


def _round_bf16(a: np.ndarray) -> np.ndarray:
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def _plugin_stable(model: Any) -> None:
    """Rewrite the f32 ops the CPU plugin would rebuild (losing their f32 mark) into equivalents it
    keeps: Squeeze/Unsqueeze → Reshape, Interpolate-11 → 4, MaxPool-8 → 1, a fully connected
    MatMul → a 1x1 convolution with the rows laid out as its height (fast in f32), and, in a graph
    with static shapes (:func:`serverless.engine.for_size`), a Gather of the one item of an axis →
    Reshape and a Pad-12 by constant non-negative pads → Pad-1."""
    for op in model.get_ordered_ops():
        kind, version = op.get_type_name(), op.get_type_info().version_id
        if kind in ("Squeeze", "Unsqueeze") and op.input_value(0).get_element_type().get_type_name() == "f32":
            new = _as_reshape(op)
        elif kind == "Interpolate" and version == "opset11" and op.get_input_size() == 2:
            new = _as_interpolate4(op)
        elif kind == "MaxPool" and version == "opset8" and not op.output(1).get_target_inputs():
            new = _as_maxpool1(op)
        elif kind == "MatMul" and _constant(op.input_value(1)) is not None:
            new = _as_convolution(op)
        elif kind == "Gather" and op.get_output_partial_shape(0).is_static:
            new = _gather_as_reshape(op)
        elif kind == "Pad" and version == "opset12":
            new = _as_pad1(op)
        else:
            continue
        if new is not None:
            op.output(0).replace(new.output(0))


def _as_reshape(op: Any) -> Any:
    import openvino.opset13 as ops

    x = op.input_value(0)
    axes = _constant(op.input_value(1)) if op.get_input_size() > 1 else None
    rank = x.get_partial_shape().rank
    if axes is None or rank.is_dynamic:
        return None
    rank_in = rank.get_length()
    dims = ops.shape_of(x, "i64")
    if op.get_type_name() == "Squeeze":
        dropped = {int(a) % rank_in for a in axes.ravel()}
        kept = [i for i in range(rank_in) if i not in dropped]
        target = ops.gather(dims, _i64(*kept), ops.constant(np.int64(0)))
    else:
        rank_out = rank_in + axes.size
        added = {int(a) % rank_out for a in axes.ravel()}
        source = iter(range(rank_in))
        target = ops.concat([
            _i64(1) if i in added else ops.gather(dims, _i64(next(source)), ops.constant(np.int64(0)))
            for i in range(rank_out)
        ], 0)  # fmt: skip
    return ops.reshape(x, target, False)


def _gather_as_reshape(op: Any) -> Any:
    """Gather of index 0 (or -1) of an axis of length 1 (torchvision's ``images[0]``) → Reshape."""
    import openvino.opset13 as ops

    index, axis = _constant(op.input_value(1)), _constant(op.input_value(2))
    shape = op.input_value(0).get_partial_shape()
    if index is None or axis is None or index.ndim or shape.rank.is_dynamic:
        return None
    if op.get_attributes()["batch_dims"]:
        return None
    length = shape[int(axis) % shape.rank.get_length()]
    if length.is_dynamic or length.get_length() != 1 or int(index) not in (0, -1):
        return None
    return ops.reshape(op.input_value(0), _i64(*op.get_output_shape(0)), False)


def _as_pad1(op: Any) -> Any:
    """Pad-12 by constant pads that are all non-negative (torchvision's padding of the batch to a
    multiple of 32, once its size is known) → Pad-1, which the plugin would make of it anyway."""
    import openvino.opset1 as ops1

    begin, end = _constant(op.input_value(1)), _constant(op.input_value(2))
    if begin is None or end is None or (begin < 0).any() or (end < 0).any():
        return None
    value = op.input_value(3) if op.get_input_size() > 3 else None
    return ops1.pad(op.input_value(0), begin, end, op.get_attributes()["pad_mode"], value)


def _as_interpolate4(op: Any) -> Any:
    import openvino.opset10 as ops10

    a = op.get_attributes()
    rank = op.input_value(0).get_partial_shape().rank.get_length()
    if a["shape_calculation_mode"] != "sizes":
        return None
    return ops10.interpolate(
        op.input_value(0), op.input_value(1), np.ones(rank, np.float32), a["mode"], "sizes",
        a["pads_begin"], a["pads_end"], a["coordinate_transformation_mode"], a["nearest_mode"],
        a["antialias"], a["cube_coeff"], np.arange(rank, dtype=np.int64),
    )  # fmt: skip


def _as_maxpool1(op: Any) -> Any:
    import openvino.opset1 as ops1

    a = op.get_attributes()
    if any(d != 1 for d in a["dilations"]):
        return None
    return ops1.max_pool(op.input_value(0), a["strides"], a["pads_begin"], a["pads_end"], a["kernel"],
                         a["rounding_type"], a["auto_pad"])  # fmt: skip


def _as_convolution(op: Any) -> Any:
    """rows x K @ W -> a 1x1 convolution of a 1 x K x rows x 1 tensor (the rows as its height): fast
    in f32, where a batch of rows is not."""
    import openvino.opset13 as ops

    a, w = op.get_attributes(), _constant(op.input_value(1))
    x = op.input_value(0)
    if a["transpose_a"] or w.ndim != 2 or x.get_partial_shape().rank.get_length() != 2:
        return None
    w = w if a["transpose_b"] else w.T  # outputs x K
    outputs, k = w.shape
    rows = ops.gather(ops.shape_of(x, "i64"), _i64(0), ops.constant(np.int64(0)))
    swap = _i64(0, 2, 1, 3)
    column = _column_of_previous(x)
    if column is None:
        source = x
        while source.get_node().get_type_name() == "Reshape":  # one reshape: the plugin fuses a chain anew
            source = source.get_node().input_value(0)
        column = ops.transpose(ops.reshape(source, ops.concat([_i64(1), rows, _i64(k, 1)], 0), False), swap)
    conv = ops.convolution(column, ops.constant(np.ascontiguousarray(w[:, :, None, None])), [1, 1], [0, 0],
                           [0, 0], [1, 1])  # fmt: skip
    return ops.reshape(ops.transpose(conv, swap), ops.concat([rows, _i64(outputs)], 0), False)


def _column_of_previous(x: Any) -> Any:
    """For ``x`` = Relu(a fully connected layer rewritten as a convolution): the Relu of that
    convolution's output, still in its column layout. Chained layers then stay in one layout, with no
    transposes between them for the plugin to move and rebuild (which loses their f32 mark)."""
    import openvino.opset13 as ops

    relu = x.get_node()
    if relu.get_type_name() != "Relu":
        return None
    back = relu.input_value(0).get_node()
    if back.get_type_name() != "Reshape":
        return None
    transpose = back.input_value(0).get_node()
    if transpose.get_type_name() != "Transpose":
        return None
    column = transpose.input_value(0)
    return ops.relu(column) if column.get_node().get_type_name() == "Convolution" else None


def _triple_convolutions(model: Any) -> None:
    """Each convolution with a constant kernel larger than 1x1 -> x_hi·W_lo + x_lo·W_hi + x_hi·W_hi."""
    import openvino.opset13 as ops

    for op in model.get_ordered_ops():
        w = _constant(op.input_value(1)) if op.get_type_name() == "Convolution" else None
        if w is None or w.shape[2] * w.shape[3] == 1:
            continue
        x = op.input_value(0)
        w_hi, w_lo = bf16_parts(w)
        head = ops.convert(x, "bf16")
        x_hi = ops.convert(head, "f32")
        for node, step in ((head, "round"), (x_hi, "widen")):
            node.set_friendly_name(f"{op.get_friendly_name()}/{step}{SPLIT_SUFFIX}")
        minus = ops.constant(np.full((1, w.shape[1], 1, 1), -1, np.float32))  # a scalar -1 is rebuilt
        x_lo = ops.add(x, ops.multiply(x_hi, minus))
        small = ops.add(_like(op, x_hi, w_lo, "hi_lo"), _like(op, x_lo, w_hi, "lo_hi"))
        op.output(0).replace(ops.add(small, _like(op, x_hi, w_hi, "hi_hi")).output(0))


def _like(op: Any, inputs: Any, kernel: np.ndarray, part: str) -> Any:
    """Convolution ``op`` of ``inputs`` by ``kernel``, named to compute in bf16."""
    import openvino.opset13 as ops

    a = op.get_attributes()
    node = ops.convolution(inputs, ops.constant(kernel), a["strides"], a["pads_begin"], a["pads_end"],
                           a["dilations"], a["auto_pad"])  # fmt: skip
    node.set_friendly_name(f"{op.get_friendly_name()}/{part}{BF16_SUFFIX}")
    return node


def _keep_rest_f32(core: Any, model: Any) -> Any:
    """``model`` with every layer but the bf16 convolutions marked to stay f32. The mark has no
    Python API; it is written into the serialized graph, where OpenVINO reads it back."""
    import openvino as ov

    def mark(match: re.Match) -> str:
        head = match.group(0)
        if BF16_SUFFIX + '"' in head or re.search(r'type="(Parameter|Const|Result)"', head):
            return head
        return head + "\n" + KEEP_F32

    with tempfile.TemporaryDirectory(prefix="bf16x3-") as tmp:
        xml, binary = Path(tmp) / "model.xml", Path(tmp) / "model.bin"
        ov.save_model(model, xml, compress_to_fp16=False)
        text = re.sub(r"<layer [^>]*>", mark, xml.read_text(encoding="utf-8"))
        weights = np.fromfile(binary, np.uint8) if binary.stat().st_size else np.zeros(1, np.uint8)
        return core.read_model(text.encode("utf-8"), ov.Tensor(weights))


def _i64(*values: int) -> Any:
    import openvino.opset13 as ops

    return ops.constant(np.array(values, np.int64))


def _constant(value: Any) -> np.ndarray | None:
    """The data of a Constant input, else None."""
    node = value.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None
