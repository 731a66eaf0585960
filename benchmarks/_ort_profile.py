"""What onnxruntime does on its own, observed from outside: the intra-op threads a default CPU
session starts, and its profiler's per-layer kernel times."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from oecl_runtime.backends.ort import session_options


def ort_default_threads() -> int | None:
    """The intra-op thread count onnxruntime chooses by itself, as `oecl serve` gets it.

    onnxruntime does not report it, so it is counted: a default CPU session starts that many
    pool threads minus one (the calling thread works too). Linux only (/proc/self/task).
    """
    import onnx
    from onnx import TensorProto, helper

    task = Path("/proc/self/task")
    if not task.is_dir():
        return None
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    before = len(os.listdir(task))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    started = len(os.listdir(task)) - before
    del session
    return started + 1 if started >= 0 else None


def ort_layer_profile(path: Path, threads: int, chw: tuple[int, int, int], batch: int,
                      runs: int = 10) -> list[dict[str, Any]]:
    """onnxruntime's own per-node kernel times (its profiler, after graph optimisation) for the
    convolutions of one batch, grouped by kernel and shape: where the fp32 time goes.
    Multiply-adds per node = output elements x weight elements / output channels, which holds
    for onnxruntime's blocked (NCHWc) weights as for plain OIHW ones. (Its GEMMs are left out:
    the profiler does not list their prepacked weights, and they are a few per mille.)"""
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options("cpu", threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).integers(0, 256, (batch, *chw), dtype=np.uint8)
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    key_of: dict[str, tuple[str, str, str, int]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") \
                or args.get("op_name") not in ("Conv", "FusedConv"):
            continue
        x_shape, w_shape = (next(iter(t.values())) for t in args["input_type_shape"][:2])
        out = next(iter(args["output_type_shape"][0].values()))
        macs = int(np.prod(out)) * int(np.prod(w_shape)) // out[1]
        per_node.setdefault(e["name"], []).append(e["dur"] / 1e6)
        key_of[e["name"]] = ("x".join(map(str, w_shape[2:4])), "x".join(map(str, x_shape[2:4])),
                             "x".join(map(str, out[1:])), macs)
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for node, secs in per_node.items():
        kernel, size_in, out, macs = key_of[node]
        g = groups.setdefault((kernel, size_in, out), {
            "kernel": kernel, "input_hw": size_in, "output_chw": out, "nodes": 0,
            "seconds": 0.0, "macs": 0})
        g["nodes"] += 1
        g["seconds"] += statistics.median(secs[1:] or secs)  # the first run warms up
        g["macs"] += macs
    rows = sorted(groups.values(), key=lambda g: -g["seconds"])
    for g in rows:
        g["gflop_per_s"] = 2e-9 * g["macs"] / g["seconds"]
    return rows
