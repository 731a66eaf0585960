"""onnxruntime CPU session variants on one fp32 model, side by side: which settings make the
runtime's fp32 path faster than the session `oecl_runtime` opens by default?

Each variant scores the same random uint8 batch (seed 0, as `oecl_runtime.bench.bench_backend`
draws it); rounds rotate the order and report images/s of the median round; every variant's
norms are checked against the default session's.

    python benchmarks/bench_ort_cpu.py --artifact runs/bench-runtime/<run>-model
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _harness import RESULTS, command_line, device_name, log, md_table
from _timing import rotated_rounds
from onnx import helper, numpy_helper, shape_inference

from oecl_runtime import Artifact
from oecl_runtime.atomic import write_json
from oecl_runtime.backends.ort import session_options

Run = Callable[[np.ndarray], np.ndarray]


def session(model: str | bytes, threads: int, config: dict[str, str] | None = None,
            disabled: list[str] | None = None, spinning: bool = False) -> ort.InferenceSession:
    """A CPU session set up like `oecl_runtime`'s backend, plus `config` entries."""
    opts = session_options("cpu", threads, spinning=spinning)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def whole(sess: ort.InferenceSession, name: str) -> Run:
    return lambda x: sess.run(["norm"], {name: x})[0]


def split(sess: ort.InferenceSession, name: str, size: int) -> Run:
    return lambda x: np.concatenate([sess.run(["norm"], {name: x[i:i + size]})[0]
                                     for i in range(0, len(x), size)])


def replicas(sessions: list[ort.InferenceSession], name: str) -> Run:
    """One single-thread session per core, each on its share of the batch, in parallel
    (onnxruntime releases the GIL while it runs)."""
    pool = ThreadPoolExecutor(len(sessions))

    def run(x: np.ndarray) -> np.ndarray:
        parts = np.array_split(x, len(sessions))
        futures = [pool.submit(s.run, ["norm"], {name: p}) for s, p in zip(sessions, parts,
                                                                           strict=True)]
        return np.concatenate([f.result()[0] for f in futures])

    return run


def small_maps_as_gemm(model: onnx.ModelProto, max_pixels: int = 16) -> tuple[bytes, int]:
    """The graph with every 3x3 / stride 1 / pad 1 convolution whose output map has at most
    `max_pixels` pixels rewritten as one GEMM over the whole batch: NHWC, Pad, nine Slices
    concatenated per pixel (im2col), Gemm with the reshaped weight and the bias, back to NCHW.
    Returns the serialised model and the number of convolutions rewritten."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    weights = {i.name: i for i in m.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        added.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def attr(node: onnx.NodeProto, key: str, default: Any) -> Any:
        found = [helper.get_attribute_value(a) for a in node.attribute if a.name == key]
        return found[0] if found else default

    count = 0
    for node in m.graph.node:
        out = shapes.get(node.output[0], [])
        w = numpy_helper.to_array(weights[node.input[1]]) if node.op_type == "Conv" else None
        if (w is None or w.shape[2:] != (3, 3) or attr(node, "group", 1) != 1
                or attr(node, "strides", [1, 1]) != [1, 1] or attr(node, "pads", [0] * 4) != [1] * 4
                or len(out) != 4 or out[2] * out[3] > max_pixels):
            nodes.append(node)
            continue
        count += 1
        p = f"gemm{count}_"
        (o, c), (h, wd) = w.shape[:2], out[2:]
        bias = (numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2
                else np.zeros(o, np.float32))
        # rows of the GEMM weight in the order the slices are concatenated: (kh, kw, c)
        const(p + "w", w.transpose(2, 3, 1, 0).reshape(9 * c, o), np.float32)
        const(p + "b", bias, np.float32)
        nodes += [helper.make_node("Transpose", [node.input[0]], [p + "nhwc"], perm=[0, 2, 3, 1]),
                  helper.make_node("Pad", [p + "nhwc", const(p + "pads", [0, 1, 1, 0, 0, 1, 1, 0])],
                                   [p + "pad"])]
        taps = []
        for i in range(3):
            for j in range(3):
                t = f"{p}{i}{j}"
                nodes.append(helper.make_node(
                    "Slice", [p + "pad", const(t + "s", [i, j]), const(t + "e", [i + h, j + wd]),
                              const(t + "a", [1, 2])], [t]))
                taps.append(t)
        nodes += [
            helper.make_node("Concat", taps, [p + "col"], axis=3),
            helper.make_node("Reshape", [p + "col", const(p + "rows", [-1, 9 * c])], [p + "x"]),
            helper.make_node("Gemm", [p + "x", p + "w", p + "b"], [p + "y"]),
            helper.make_node("Reshape", [p + "y", const(p + "map", [-1, h, wd, o])], [p + "y4"]),
            helper.make_node("Transpose", [p + "y4"], [node.output[0]], perm=[0, 3, 1, 2]),
        ]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(added)
    return m.SerializeToString(), count


def variants(path: Path, name: str, threads: int) -> tuple[dict[str, Run], dict[str, str]]:
    model = path.read_bytes()
    rewritten, n_rewritten = small_maps_as_gemm(onnx.load_from_string(model))
    runs: dict[str, Run] = {
        "default": whole(session(model, threads), name),
        "spinning": whole(session(model, threads, spinning=True), name),
        "dynamic block base 4": whole(session(model, threads,
                                              {"session.dynamic_block_base": "4"}), name),
        "8 runs of 8": split(session(model, threads), name, 8),
        f"{threads} single-thread sessions": replicas(
            [session(model, 1) for _ in range(threads)], name),
        "no NCHWc transformer": whole(session(model, threads, disabled=["NchwcTransformer"]),
                                      name),
        "4x4 maps as GEMM": whole(session(rewritten, threads), name),
    }
    notes = {
        "default": "ORT_ENABLE_ALL, idle pool threads sleep, as oecl_runtime opens it",
        "spinning": "session.intra_op.allow_spinning = 1 (onnxruntime's own default)",
        "dynamic block base 4": "session.dynamic_block_base = 4",
        "8 runs of 8": "the batch split into 8 calls of 8 images",
        f"{threads} single-thread sessions": "data-parallel over the batch, one thread each",
        "no NCHWc transformer": "disabled_optimizers=['NchwcTransformer']: im2col + GEMM",
        "4x4 maps as GEMM": f"{n_rewritten} convolutions rewritten as batched im2col GEMMs",
    }
    return runs, notes


def markdown(report: dict[str, Any]) -> str:
    rows = [[r["variant"], r["setting"], f"{r['images_per_s_median']:.1f}",
             " / ".join(f"{v:.0f}" for v in r["images_per_s_rounds"]), f"{r['vs_default']:.2f}x",
             f"{r['max_rel_diff_vs_default']:.1e}"] for r in report["variants"]]
    return "\n".join([
        f"{report['device']}; onnxruntime {report['onnxruntime']}; batch {report['batch']}, "
        f"{report['threads']} threads; images/s, median of {report['rounds']} rounds", "",
        *md_table(["variant", "setting", "images/s", "rounds", "vs default", "max rel. diff"],
                  rows, "llrlrr")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True, help="An exported model directory.")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iterations", type=int, default=6, help="Timed calls per variant and round.")
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS / "ort-cpu-variants.json")
    args = p.parse_args(argv)

    artifact = Artifact.open(args.artifact)
    spec = artifact.spec
    path = artifact.path_of(artifact.require("onnx", "fp32"))
    runs, notes = variants(path, artifact.input_name, args.threads)
    x = np.random.default_rng(0).integers(
        0, 256, (args.batch, spec.channels, spec.height, spec.width), dtype=np.uint8)
    ref = runs["default"](x)
    agree = {k: float(np.max(np.abs(fn(x) - ref) / np.abs(ref))) for k, fn in runs.items()}
    chw = (spec.channels, spec.height, spec.width)
    timed = rotated_rounds(runs, chw, args.batch, args.rounds, args.iterations, warmup=2,
                           max_seconds=60.0, pause=args.pause, log=log)
    rates = {k: [r["images_per_s"] for r in rows] for k, rows in timed.items()}
    base = statistics.median(rates["default"])
    rows = [{"variant": k, "setting": notes[k], "images_per_s_rounds": v,
             "images_per_s_median": statistics.median(v),
             "vs_default": statistics.median(v) / base, "max_rel_diff_vs_default": agree[k]}
            for k, v in rates.items()]
    report = {"benchmark": "onnxruntime-cpu-variants",
              "date": datetime.now(timezone.utc).date().isoformat(),
              "command": command_line("bench_ort_cpu.py", argv),
              "device": device_name("cpu"), "onnxruntime": ort.__version__,
              "model": args.artifact.name, "batch": args.batch, "threads": args.threads,
              "rounds": args.rounds, "iterations": args.iterations, "variants": rows}
    write_json(args.out, report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
