"""The fp32 compute ceiling of this machine: the best fp32 GEMM rate of torch and onnxruntime at
one thread count, and each fp32 path's arithmetic rate as a share of it."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _harness import md_table
from _timing import best_seconds

from oecl_runtime.backends.ort import session_options


def fp32_matmul_rates(threads: int, n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of one n x n x n fp32 matrix product (best of `repeats`) in each library's own
    GEMM: torch (MKL / oneDNN) and onnxruntime (MLAS, the right operand a prepacked constant)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        t_torch = best_seconds(lambda: torch.mm(ta, tb), repeats)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b, "b")])
    # IR 9 / opset 17: readable by every onnxruntime this project supports.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), session_options("cpu", threads),
                                providers=["CPUExecutionProvider"])
    t_ort = best_seconds(lambda: sess.run(None, {"a": a}), repeats)
    return {"torch_mm": flop / t_torch / 1e9, "onnxruntime_matmul": flop / t_ort / 1e9}


def compute_ceiling(summary: dict[str, dict[str, Any]], macs: int,
                    rates: dict[int, dict[str, float]],
                    target_images_per_s: float) -> dict[str, Any]:
    """Each fp32 path's arithmetic rate against the fastest fp32 GEMM measured in the same run
    (over sizes and libraries: the practical fp32 ceiling of this machine at this thread count),
    and what an fp32 target of `target_images_per_s` asks in those terms."""
    peak = max(r for by_lib in rates.values() for r in by_lib.values())
    flop_per_image = 2.0 * macs
    ceiling = peak * 1e9 / flop_per_image
    paths = {}
    for label, s in summary.items():
        if "fp32" not in label:
            continue  # int8 runs other instructions; the fp32 GEMM rate does not bound it
        rate = s["images_per_s_median"] * flop_per_image / 1e9
        paths[label] = {"gflop_per_s": rate, "share_of_gemm_peak": rate / peak}
    return {"macs_per_image": macs,
            "gemm_gflop_per_s": {str(n): by_lib for n, by_lib in rates.items()},
            "gemm_peak_gflop_per_s": peak, "fp32_ceiling_images_per_s": ceiling,
            "paths": paths,
            "fp32_target_images_per_s": target_images_per_s,
            "fp32_target_share_of_gemm_peak": target_images_per_s / ceiling,
            "note": "images/s x 2 x multiply-adds of the ONNX graph (convolutions and matrix "
                    "products) against the best fp32 n x n GEMM of torch and onnxruntime at the "
                    "same thread count"}


def gemm_text(rates: dict[Any, dict[str, float]]) -> str:
    """'1024^3 torch_mm 95, onnxruntime_matmul 101; 2048^3 ...' (GFLOP/s)."""
    return "; ".join(f"{n}^3 " + ", ".join(f"{k} {v:.0f}" for k, v in by_lib.items())
                     for n, by_lib in rates.items())


def ceiling_markdown(c: dict[str, Any], batch: int) -> list[str]:
    """The ceiling paragraph and onnxruntime's per-layer table of a `compute_ceiling` record
    (with its "onnxruntime_fp32_layers" from `_ort_profile.ort_layer_profile`)."""
    shares = "; ".join(f"{label} {p['gflop_per_s']:.0f} GFLOP/s = "
                       f"{100 * p['share_of_gemm_peak']:.0f}%" for label, p in c["paths"].items())
    return [
        f"Compute ceiling: {c['macs_per_image'] / 1e6:.1f} M multiply-adds per image; "
        f"fp32 GEMM GFLOP/s: {gemm_text(c['gemm_gflop_per_s'])}; the best, "
        f"{c['gemm_peak_gflop_per_s']:.0f}, allows at most "
        f"{c['fp32_ceiling_images_per_s']:.0f} fp32 images/s. Share of that GEMM rate: "
        f"{shares}. The fp32 target asks for {c['fp32_target_images_per_s']:.0f} images/s, "
        f"{100 * c['fp32_target_share_of_gemm_peak']:.0f}% of the GEMM rate.",
        "", f"onnxruntime fp32 per layer (its profiler, batch {batch}; profiling slows every "
        "layer alike, so compare rows, not the GEMM rate):",
        "", *md_table(
            ["convolution", "input HxW", "output CxHxW", "nodes", "ms per batch", "GFLOP/s"],
            ([g["kernel"], g["input_hw"], g["output_chw"], g["nodes"],
              f"{1000 * g['seconds']:.1f}", f"{g['gflop_per_s']:.0f}"]
             for g in c["onnxruntime_fp32_layers"]), "lllrrr")]
