"""The TensorRT-bound ONNX files (fp32, fp16, symmetric int8; one view and several) against the
TensorRT 10 ONNX parser's constraints the project relies on, offline; and the checker itself
against hand-made graphs that break each constraint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from oecl_train.export import INT8_SYMMETRIC_FILE, export_run, trt_compat
from oecl_train.export.graph import OPSET

TRT_FILES = ("model.onnx", "model.fp16.onnx", INT8_SYMMETRIC_FILE)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[int, object]:
    """Artifacts of one tiny run with one view and with four baked in (every CPU format)."""
    from oecl_train.config import TrainConfig
    from oecl_train.data import Splits
    from oecl_train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        cfg = TrainConfig(name="tiny", out_dir=str(root), data="digits", id_class="0",
                          oe="photos", image_size=16, depth="resnet10", width=4, batch_size=16,
                          steps=2, precision="fp32", hflip=False, device="cpu",
                          keep_checkpoints=1)
        splits = Splits.from_config(cfg)
        Trainer(cfg, splits, root / "tiny", progress=False).fit()
        out = {}
        for views in (1, 4):
            out[views] = root / f"model-v{views}"
            export_run(root / "tiny", out[views], "onnx,onnx-fp16,onnx-int8", max_batch=8,
                       embedding=False, calib_images=8, verify=False, device="cpu",
                       views=views, splits=splits, log=lambda m: None)
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("views", [1, 4])
@pytest.mark.parametrize("name", TRT_FILES)
def test_tensorrt_bound_files_pass(artifacts, views, name):
    assert trt_compat.check(artifacts[views] / name) == []


@pytest.mark.parametrize("views", [1, 4])
def test_symmetric_int8_keeps_biases_float_and_the_artifact_says_so(artifacts, views):
    out = artifacts[views]

    def bias_sources(name):
        model = onnx.load(str(out / name))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        made_by = {o: n for n in model.graph.node for o in n.output}
        kinds = []
        for n in model.graph.node:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
                b = n.input[2]
                if b in inits:
                    kinds.append(TensorProto.DataType.Name(inits[b]))
                else:  # dequantised: the type of what the DequantizeLinear reads
                    kinds.append("DQ:" + TensorProto.DataType.Name(inits[made_by[b].input[0]]))
        return set(kinds)

    assert bias_sources(INT8_SYMMETRIC_FILE) == {"FLOAT"}
    # onnxruntime's own form (its float stem convolution keeps a float bias).
    assert "DQ:INT32" in bias_sources("model.int8.onnx")
    # The onnxruntime file is not for TensorRT, and the checker says why.
    assert any("INT8 only" in p for p in trt_compat.check(out / "model.int8.onnx"))
    files = {f["path"]: f for f in json.loads((out / "oecl.json").read_text())["files"]}
    assert files[INT8_SYMMETRIC_FILE]["quantization"]["biases"].startswith("float")
    assert files["model.int8.onnx"]["quantization"]["biases"] == "int32"


# ------------------------------------------------------------ the checker, graph by graph


def _graph(nodes, inits, opset=OPSET, inputs=None, domains=()):
    x = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    g = helper.make_graph(nodes, "g", x,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(g, opset_imports=ops)


def _qdq_conv(w_axis=0, zp=0, bias_int32=False, act_zp=True):
    """x -> Q/DQ -> Conv(DQ(w), bias) -> y, in the form the project writes."""
    inits = {
        "s": np.array(0.1, np.float32), "zp": np.array(zp, np.int8),
        "w": np.ones((2, 4, 3, 3), np.int8), "ws": np.full(2 if w_axis == 0 else 4, 0.05,
                                                           np.float32),
        "wzp": np.zeros(2 if w_axis == 0 else 4, np.int8),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"] if act_zp else ["x", "s"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"] if act_zp else ["xq", "s"],
                         ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=w_axis),
    ]
    if bias_int32:
        inits.update(b=np.ones(2, np.int32), bs=np.full(2, 0.005, np.float32),
                     bzp=np.zeros(2, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", ["b", "bs", "bzp"], ["bd"], axis=0))
    else:
        inits["bd"] = np.ones(2, np.float32)
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="conv"))
    return nodes, inits


def _problems(tmp_path, model) -> list[str]:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return trt_compat.check(path)


def test_the_form_the_project_writes_passes(tmp_path):
    assert _problems(tmp_path, _graph(*_qdq_conv())) == []


@pytest.mark.parametrize("kw, message", [
    (dict(bias_int32=True), "input of type INT32; TensorRT 10 dequantises INT8 only"),
    (dict(zp=3), "non-zero zero point"),
    (dict(w_axis=1), "per-channel axis 1, the output channels are on axis [0]"),
    (dict(act_zp=False), "no INT8 zero point, so the output is UINT8"),
])
def test_each_quantisation_rule_is_enforced(tmp_path, kw, message):
    problems = _problems(tmp_path, _graph(*_qdq_conv(**kw)))
    assert any(message in p for p in problems), problems


def test_opset_domain_op_and_uint8_input_rules(tmp_path):
    nodes, inits = _qdq_conv()
    assert any("opset 21 outside" in p
               for p in _problems(tmp_path, _graph(nodes, inits, opset=21)))
    odd = [*nodes[:-1], helper.make_node("Conv", ["xd", "wd", "bd"], ["c"]),
           helper.make_node("Hardmax", ["c"], ["h"]),
           helper.make_node("FusedGemm", ["h", "h"], ["y"], domain="com.microsoft")]
    problems = _problems(tmp_path, _graph(odd, inits, domains=("com.microsoft",)))
    assert any("Hardmax" in p and "operator table" in p for p in problems)
    assert any("'com.microsoft'" in p for p in problems)
    u8 = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 8, 8])]
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    assert any("UINT8 input x feeds ['Relu']" in p
               for p in _problems(tmp_path, _graph(relu, {}, inputs=u8)))
    cast = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
    assert _problems(tmp_path, _graph(cast, {}, inputs=u8)) == []
