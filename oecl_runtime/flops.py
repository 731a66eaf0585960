"""Multiply-accumulates per image of an ONNX graph, so that a throughput can be read as a share
of what the hardware can do (images/s x 2 x MACs = FLOP/s).

Only the ops that carry nearly all of a CNN's arithmetic are counted: convolutions and matrix
products, in float (Conv, Gemm, MatMul) and quantised (QLinearConv, ConvInteger, QLinearMatMul,
MatMulInteger) form. Element-wise ops, pooling and reductions are left out; in a ResNet they are
well under 1 % of the multiply-adds.
"""

from __future__ import annotations

import os
from math import prod

import onnx
from onnx import shape_inference

# convolution op type -> index of its weight input
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
# matrix products: the left operand is input 0 in each
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}


def graph_macs(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Multiply-accumulates of one image (batch 1) through the graph's convolutions and matrix
    products. Raises ValueError if a counted op's shape cannot be inferred."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    proto = _at_batch_one(proto)
    inferred = shape_inference.infer_shapes(proto, strict_mode=False)
    shapes = _known_shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        if node.op_type in _CONV_WEIGHT:
            weight = _shape(shapes, node, node.input[_CONV_WEIGHT[node.op_type]])
            # Each output element of a grouped convolution sums Cin/groups x kH x kW products,
            # which is exactly the weight's shape past its first (output-channel) axis.
            total += prod(_shape(shapes, node, node.output[0])) * prod(weight[1:])
        elif node.op_type in _MATMUL:
            left = _shape(shapes, node, node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            inner = left[0] if (node.op_type == "Gemm" and trans_a) else left[-1]
            total += prod(_shape(shapes, node, node.output[0])) * inner
    return total


def _at_batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    initializers = {i.name for i in out.graph.initializer}
    for value in out.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    return out


def _known_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    g = proto.graph
    shapes: dict[str, list[int | None]] = {i.name: list(i.dims) for i in g.initializer}
    for value in [*g.input, *g.value_info, *g.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                  for d in t.shape.dim]
    return shapes


def _shape(shapes: dict[str, list[int | None]], node: onnx.NodeProto, name: str) -> list[int]:
    dims = shapes.get(name)
    if dims is None or any(d is None for d in dims):
        raise ValueError(f"{node.op_type} node {node.name or '(unnamed)'}: the shape of "
                         f"{name!r} is not known at batch 1 ({dims})")
    return [int(d) for d in dims]  # type: ignore[arg-type]
