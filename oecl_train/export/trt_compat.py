"""What TensorRT 10's ONNX parser (onnx-tensorrt) accepts, for the constructs the project's
TensorRT-bound graphs use, checked offline (no TensorRT needed).

From onnx-tensorrt's operator table for TensorRT 10 and TensorRT's explicit-quantisation
rules:
- the default-domain opset lies in [9, 20] and no op comes from another domain;
- every op is one TensorRT implements (the subset below: what these graphs can contain);
- `DequantizeLinear` reads INT8 (the table also admits FP8/INT4, which the project never
  writes; INT32, what onnxruntime makes of a quantised bias, is refused), `QuantizeLinear`
  reads FLOAT/FLOAT16 and writes INT8; every zero point is 0;
- a per-channel scale belongs to a constant weight, on its output-channel axis (0 for
  `Conv` and for `Gemm` with transB, the last axis for `MatMul`); activations are per tensor;
- a UINT8 graph input is only cast (TensorRT takes UINT8 at the network's edge only).

`check` lists every violation as one line; an empty list means the file passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

OPSET_RANGE = (9, 20)
# Ops of onnx-tensorrt's TensorRT 10 table that a served graph (network, views, norm, QDQ)
# may contain.
SUPPORTED_OPS = frozenset({
    "Abs", "Add", "AveragePool", "Cast", "Clip", "Concat", "Conv", "DequantizeLinear", "Div",
    "Einsum", "Exp", "Expand", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "Identity",
    "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Pad", "Pow", "QuantizeLinear",
    "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
    "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tile", "Transpose", "Unsqueeze", "Where",
})
QUANTIZED_TYPES = {TensorProto.INT8}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}


def check(path: str | Path) -> list[str]:
    """Every way the ONNX file at `path` breaks the TensorRT 10 constraints above."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    name = Path(path).name
    problems: list[str] = []
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            if not OPSET_RANGE[0] <= o.version <= OPSET_RANGE[1]:
                problems.append(f"{name}: opset {o.version} outside TensorRT 10's "
                                f"{OPSET_RANGE[0]}-{OPSET_RANGE[1]}")
        elif any(n.domain == o.domain for n in g.node):
            problems.append(f"{name}: ops from domain {o.domain!r}, which TensorRT lacks")
    inits = {i.name: i for i in g.initializer}
    types = {i.name: i.data_type for i in g.initializer}
    for v in (*g.input, *g.value_info, *g.output):
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in g.node:
        where = f"{name}: {n.op_type} {n.name or n.output[0]}"
        if n.domain not in ("", "ai.onnx"):
            continue  # reported once per domain above
        if n.op_type not in SUPPORTED_OPS:
            problems.append(f"{where}: op not in TensorRT 10's ONNX operator table")
        if n.op_type == "DequantizeLinear":
            problems += _dequantize(n, where, types, inits, consumers)
        elif n.op_type == "QuantizeLinear":
            problems += _quantize(n, where, types, inits)
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.UINT8:
            users = {c.op_type for c in consumers.get(inp.name, [])}
            if users - {"Cast"}:
                problems.append(f"{name}: UINT8 input {inp.name} feeds {sorted(users)}; "
                                "TensorRT takes UINT8 only into a Cast")
    return problems


def _zero_point(n: onnx.NodeProto, where: str, inits: dict) -> list[str]:
    if len(n.input) < 3 or not n.input[2]:
        return []
    zp = inits.get(n.input[2])
    if zp is None:
        return [f"{where}: zero point is not a constant"]
    out = []
    if zp.data_type not in QUANTIZED_TYPES:
        out.append(f"{where}: zero point of type {TensorProto.DataType.Name(zp.data_type)}, "
                   "TensorRT takes INT8")
    if np.any(numpy_helper.to_array(zp) != 0):
        out.append(f"{where}: non-zero zero point (TensorRT quantises symmetrically)")
    return out


def _scale_size(n: onnx.NodeProto, inits: dict) -> int | None:
    s = inits.get(n.input[1])
    return None if s is None else int(np.prod(s.dims, dtype=np.int64))


def _dequantize(n, where, types, inits, consumers) -> list[str]:
    out = []
    x_type = types.get(n.input[0])
    if x_type not in QUANTIZED_TYPES:
        got = TensorProto.DataType.Name(x_type) if x_type else "unknown"
        # One line for the node: its zero point and axis follow from the wrong type.
        return [f"{where}: input of type {got}; TensorRT 10 dequantises INT8 only "
                "(keep biases float)"]
    out += _zero_point(n, where, inits)
    size = _scale_size(n, inits)
    if size is None:
        out.append(f"{where}: scale is not a constant")
    elif size > 1:
        out += _per_channel(n, where, inits, consumers)
    return out


def _per_channel(n, where, inits, consumers) -> list[str]:
    weight = inits.get(n.input[0])
    if weight is None:
        return [f"{where}: per-channel scale on an activation (TensorRT: per tensor)"]
    rank = len(weight.dims)
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    axis = axis + rank if axis < 0 else axis
    users = consumers.get(n.output[0], [])
    want = set()
    for u in users:
        if u.op_type == "Conv" and u.input[1] == n.output[0]:
            want.add(0)
        elif u.op_type == "Gemm" and u.input[1] == n.output[0]:
            trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
            want.add(0 if trans_b else 1)
        elif u.op_type == "MatMul" and u.input[1] == n.output[0]:
            want.add(rank - 1)
        else:
            return [f"{where}: per-channel weight feeds {u.op_type}, not a Conv/Gemm/MatMul "
                    "weight input"]
    if want != {axis}:
        return [f"{where}: per-channel axis {axis}, the output channels are on axis "
                f"{sorted(want)}"]
    if weight.dims[axis] != _scale_size(n, inits):
        return [f"{where}: {_scale_size(n, inits)} scales for {weight.dims[axis]} channels"]
    return []


def _quantize(n, where, types, inits) -> list[str]:
    out = []
    x_type = types.get(n.input[0])
    if x_type not in FLOAT_TYPES:
        got = TensorProto.DataType.Name(x_type) if x_type else "unknown"
        out.append(f"{where}: quantises {got}; TensorRT quantises FLOAT/FLOAT16")
    # Without a zero point (and output_dtype) ONNX's QuantizeLinear writes UINT8.
    if len(n.input) < 3 or not n.input[2]:
        out.append(f"{where}: no INT8 zero point, so the output is UINT8")
    out += _zero_point(n, where, inits)
    size = _scale_size(n, inits)
    if size is None:
        out.append(f"{where}: scale is not a constant")
    elif size > 1 and n.input[0] not in inits:
        out.append(f"{where}: per-channel scale on an activation (TensorRT: per tensor)")
    return out
