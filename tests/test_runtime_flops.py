"""Multiply-accumulate counts of ONNX graphs against counts worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from oecl_runtime.flops import graph_macs


def _model(nodes, inputs, outputs, weights):
    inits = [numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)
             for name, shape in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_grouped_strided_conv_then_gemm_with_dynamic_batch():
    nodes = [
        # 8 -> 12 channels in 4 groups, 3x3, stride 2, pad 1: 16x16 -> 8x8
        helper.make_node("Conv", ["x", "w1"], ["c1"], group=4, strides=[2, 2], pads=[1] * 4),
        # 12 -> 6 channels, 1x1, no padding: 8x8 stays
        helper.make_node("Conv", ["c1", "w2"], ["c2"]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
        helper.make_node("MatMul", ["y", "w4"], ["z"]),
    ]
    m = _model(nodes, [_value("x", ["batch", 8, 16, 16])], [_value("z", ["batch", 5])],
               {"w1": (12, 2, 3, 3), "w2": (6, 12, 1, 1), "w3": (10, 6 * 8 * 8),
                "w4": (10, 5)})
    conv1 = (12 * 8 * 8) * (2 * 3 * 3)
    conv2 = (6 * 8 * 8) * 12
    gemm = 10 * 384
    matmul = 5 * 10
    assert graph_macs(m) == conv1 + conv2 + gemm + matmul


def test_gemm_trans_a_uses_the_other_axis_of_the_left_operand():
    nodes = [helper.make_node("Gemm", ["a", "b"], ["c"], transA=1)]
    m = _model(nodes, [_value("a", [7, 3])], [_value("c", [3, 4])], {"b": (7, 4)})
    assert graph_macs(m) == 3 * 4 * 7


def test_ops_without_multiply_adds_count_nothing():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    m = _model(nodes, [_value("x", [1, 4, 8, 8])], [_value("y", [1, 4, 1, 1])], {})
    assert graph_macs(m) == 0


def test_unknown_shape_is_a_clear_error():
    # The weight's shape depends on a second graph input of unknown size.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    m = _model(nodes, [_value("x", [1, 4]), _value("w", [4, "n"])], [_value("y", [1, "n"])], {})
    with pytest.raises(ValueError, match="MatMul node .*'y'.* not known"):
        graph_macs(m)


def test_exported_artifact(artifact_dir):
    """The tiny test artifact's graph as torch exports it: conv 3->8 and 8->8 (3x3, stride 2)
    and a 512->128 linear."""
    onnx_path = artifact_dir / "model.onnx"
    conv1 = (8 * 16 * 16) * (3 * 3 * 3)
    conv2 = (8 * 8 * 8) * (8 * 3 * 3)
    proj = 128 * 512
    assert graph_macs(onnx_path) == conv1 + conv2 + proj


def test_quantised_convolution_counts_like_its_float_twin():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero_u8 = numpy_helper.from_array(np.array(0, np.uint8), "zu")
    zero_i8 = numpy_helper.from_array(np.array(0, np.int8), "zi")
    weight = numpy_helper.from_array(np.zeros((6, 4, 3, 3), np.int8), "w")
    node = helper.make_node("QLinearConv", ["x", "s", "zu", "w", "s", "zi", "s", "zu"], ["y"],
                            pads=[1] * 4)
    graph = helper.make_graph(
        [node], "q", [_value("x", ["batch", 4, 8, 8], TensorProto.UINT8)],
        [_value("y", ["batch", 6, 8, 8], TensorProto.UINT8)], [scale, zero_u8, zero_i8, weight])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert graph_macs(m) == (6 * 8 * 8) * (4 * 3 * 3)
