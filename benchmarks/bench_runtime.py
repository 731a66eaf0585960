"""Serving speed on the CPU: torch eager fp32 vs onnxruntime fp32 vs onnxruntime int8 on one
trained model, then `oecl serve` under HTTP load, side by side in one run on one machine.

1. Model: a short OECL run of the default network (ResNet-18, width 64, CIFAR stem) on 32x32 RGB
   (bundled digits upscaled, photo-crop OE), trained with `run_training`, exported with
   `export_run` to ONNX fp32 + int8 with the exporter's parity check (PyTorch vs each file).
2. In process, batch 64: each backend's `run(uint8 NCHW)` timed by `oecl_runtime.bench`'s
   `bench_backend` on the same random batch, in rounds of rotating order; the median round is
   reported, and ratios are against torch eager fp32 (the same weights through the runtime's
   torch backend). torch and onnxruntime get the same number of intra-op threads.
3. HTTP: `oecl serve` in a subprocess on 127.0.0.1, one PNG image per request from the runtime's
   asyncio load client at concurrency 32; the server's /metrics give the batch sizes it formed.
   Client and server share the machine's cores, as on a one-box deployment.

    python benchmarks/bench_runtime.py                 # train 30 steps, export, measure
    python benchmarks/bench_runtime.py --quick         # width-8 smoke run, 100 requests
    python benchmarks/bench_runtime.py --artifact runs/bench-runtime/NAME-model   # reuse a model

Writes benchmarks/results/runtime-cpu.json (runtime-cpu-quick.json with --quick) and prints a
markdown table. Score: norm, higher = normal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import device_name, rotated_rounds

from oecl_runtime import Artifact
from oecl_runtime import bench as B
from oecl_runtime.atomic import write_json
from oecl_runtime.backends import Backend, open_backend
from oecl_runtime.backends.ort import OnnxRuntimeBackend, session_options
from oecl_runtime.cli import _server_runtime, request_images
from oecl_runtime.flops import graph_macs
from oecl_runtime.server import http_stack

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

# The goals this benchmark checks; a ratio is images/s over torch eager fp32's images/s.
TARGETS = {
    "onnxruntime_fp32_vs_torch": 1.5,
    "onnxruntime_int8_vs_torch": 2.5,
    "int8_auroc_diff": 0.005,
    "http_vs_in_process": 0.70,
}
# label -> (runtime backend, artifact format, precision)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch eager fp32": ("torch-cpu", "safetensors", "fp32"),
    "onnxruntime fp32": ("onnxruntime-cpu", "onnx", "fp32"),
    "onnxruntime int8": ("onnxruntime-cpu", "onnx", "int8"),
}
QUICK = dict(width=8, train_steps=3, train_batch=16, requests=100, http_warmup=32, rounds=3,
             iterations=3, warmup=1, max_seconds=2.0, pause=0.2, http_time_limit=120.0,
             gemm_sizes=[512, 1024])
FULL = dict(width=64, train_steps=30, train_batch=64, requests=10000, http_warmup=256,
            rounds=3, iterations=30, warmup=3, max_seconds=15.0, pause=1.0,
            http_time_limit=900.0, gemm_sizes=[1024, 2048, 4096])

Log = Callable[[str], None]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: width-8 model, 3 training steps, 100 requests, few iterations.")
    p.add_argument("--run", type=Path, default=None,
                   help="Reuse this trained run directory (skip training).")
    p.add_argument("--artifact", type=Path, default=None,
                   help="Reuse this exported artifact (skip training and export).")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-runtime"),
                   help="Where a new run and its artifact are written.")
    p.add_argument("--depth", default="resnet18", choices=("resnet18", "resnet10"))
    p.add_argument("--width", type=int, default=None, help="Default 64 (8 with --quick).")
    p.add_argument("--train-steps", type=int, default=None, help="Default 30 (3 with --quick).")
    p.add_argument("--train-batch", type=int, default=None,
                   help="ID (and OE) images per training step; default 64 (16 with --quick).")
    p.add_argument("--batch", type=int, default=64, help="Batch size of the in-process timing.")
    p.add_argument("--rounds", type=int, default=None,
                   help="In-process rounds, each timing every backend once (default 3).")
    p.add_argument("--iterations", type=int, default=None,
                   help="Timed calls per backend per round (default 30; fewer if --max-seconds "
                   "runs out).")
    p.add_argument("--warmup", type=int, default=None,
                   help="Untimed calls before each timing (default 3).")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="Time limit per backend per round (default 15).")
    p.add_argument("--pause", type=float, default=None,
                   help="Seconds of idle between timings, so that spinning worker threads of the "
                   "previous backend have stopped (default 1).")
    p.add_argument("--threads", type=int, default=None,
                   help="Intra-op threads of torch and onnxruntime (default: onnxruntime's own "
                   "choice, which is what `oecl serve` runs with).")
    p.add_argument("--serve-precision", choices=("fp32", "int8"), default="fp32",
                   help="ONNX file `oecl serve` runs (onnxruntime-cpu).")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=None,
                   help="Timed one-image requests (default 10000; 100 with --quick).")
    p.add_argument("--http-warmup", type=int, default=None,
                   help="Untimed requests before the timed ones (default 256).")
    p.add_argument("--http-time-limit", type=float, default=None,
                   help="No new request after this many seconds (default 900); unsent requests "
                   "count as failures.")
    p.add_argument("--max-batch", type=int, default=64, help="`oecl serve --max-batch`.")
    p.add_argument("--max-delay-ms", type=float, default=10.0, help="`oecl serve --max-delay-ms`.")
    p.add_argument("--gemm-sizes", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="n of the n x n x n fp32 GEMMs whose best rate sets the compute ceiling "
                        "(default 1024,2048,4096; 512,1024 with --quick).")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.rounds, args.iterations, args.concurrency, args.requests) < 1:
        p.error("--batch, --rounds, --iterations, --concurrency and --requests must be >= 1")
    return args


# ----------------------------------------------------------------------------- threads


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


# ----------------------------------------------------------------------------- the model


def train(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """A short run of the project's own training on 32x32 RGB; returns (run dir, summary)."""
    from oecl_train.cli import run_training
    from oecl_train.config import TrainConfig

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    cfg = TrainConfig.from_dict(dict(
        name=f"{args.depth}-w{args.width}-s{args.train_steps}-{stamp}",
        out_dir=str(args.work_dir), data="digits", id_class="0", oe="photos", image_size=32,
        channels=3, depth=args.depth, width=args.width, stem="cifar",
        batch_size=args.train_batch, steps=args.train_steps, precision="bf16",
        hflip=False,  # as the quickstart: a mirrored digit is another shape
    ))
    cfg.validate()
    log(f"training {cfg.depth} width {cfg.width}, {cfg.steps} steps of {cfg.batch_size} ID + "
        f"{cfg.batch_size} OE images, 32x32 RGB ...")
    t0 = time.perf_counter()
    result = run_training(cfg, progress=False, quick_eval=True)
    seconds = time.perf_counter() - t0
    auroc = result.get("test", {}).get("AUROC")
    log(f"trained in {seconds:.0f} s; test AUROC (norm, bf16) {auroc}")
    return Path(result["run_dir"]), {"seconds": round(seconds, 1), "test_AUROC": auroc,
                                     "config": {k: v for k, v in cfg.to_json().items()
                                                if k not in ("out_dir", "name")}}


def export(run_dir: Path, out: Path) -> tuple[dict[str, Any], str | None]:
    """Export with the parity check; returns (verification report, failure or None).

    The exporter refuses a file outside its tolerances and writes nothing. The speed of such a
    file is still worth knowing, so then it exports unchecked and runs the same check (same
    images, same reference, `verify_export`) to record the figures; the failure is kept.
    """
    from oecl_train import export as E

    formats = ["onnx", "onnx-int8"]

    def say(msg: str) -> None:
        log(f"  export: {msg}")

    try:
        # The single-pass graph (views=1), the one every earlier runtime figure measured.
        return E.export_run(run_dir, out, formats=formats, verify=True, views=1,
                            log=say)["verification"], \
            None
    except E.VerificationFailed as e:
        failure = str(e)
    log(f"export verification failed ({failure}); exporting unchecked to measure it anyway")
    E.export_run(run_dir, out, formats=formats, verify=False, views=1, log=say)
    # Writes verify.json beside the files (its "pass" is false) so that a rerun with
    # --artifact reports it.
    return E.verify_export(run_dir, out, log=say), failure


def verify_summary(report: dict[str, Any] | None, failure: str | None) -> dict[str, Any]:
    """PyTorch's AUROC, each file's AUROC and difference, from the exporter's report."""
    if report is None:
        return {"available": False,
                "note": "the artifact has no verify.json (exported with --no-verify)"}
    files = {r["path"]: {"backend": r["backend"], "AUROC": r["AUROC"],
                         "AUROC_diff": r["AUROC_diff"], "max_rel_diff": r["max_rel_diff"],
                         "mean_rel_diff": r["mean_rel_diff"], "pass": r["pass"]}
             for r in report["files"]}
    return {"available": True, "n_images": report["n_images"], "n_id": report["n_id"],
            "n_ood": report["n_ood"], "reference": report["reference"],
            "tolerances": report["tolerances"], "files": files, "pass": report["pass"],
            "exporter_refused": failure}


# ----------------------------------------------------------------------------- in process


def open_backends(artifact: Artifact, threads: int) -> dict[str, Backend]:
    out: dict[str, Backend] = {}
    for label, (name, _, precision) in BACKENDS.items():
        if name == "torch-cpu":
            # The runtime's torch backend: ScoreModel(OECLNet) from model.safetensors, eager.
            out[label] = open_backend(artifact, name, precision)
        else:
            # Built directly (not through open_backend) to pass the thread count explicitly.
            out[label] = OnnxRuntimeBackend(artifact, precision, device="cpu", threads=threads)
    return out


def parity(backends: dict[str, Backend], chw: tuple[int, int, int], batch: int) -> dict:
    """Norms of the timed batch (the same draw bench_backend makes) vs torch: same model?"""
    x = np.random.default_rng(0).integers(0, 256, (batch, *chw), dtype=np.uint8)
    ref = backends["torch eager fp32"].run(x).astype(np.float64)
    out = {}
    for label, b in backends.items():
        rel = np.abs(b.run(x) - ref) / np.maximum(np.abs(ref), 1e-12)
        out[label] = {"max_rel_diff_vs_torch": float(rel.max()),
                      "mean_rel_diff_vs_torch": float(rel.mean())}
    return out


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
        t_torch = _best_seconds(lambda: torch.mm(ta, tb), repeats)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b, "b")])
    # IR 9 / opset 17: readable by every onnxruntime this project supports.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), session_options("cpu", threads),
                                providers=["CPUExecutionProvider"])
    t_ort = _best_seconds(lambda: sess.run(None, {"a": a}), repeats)
    return {"torch_mm": flop / t_torch / 1e9, "onnxruntime_matmul": flop / t_ort / 1e9}


def compute_ceiling(summary: dict[str, dict[str, Any]], macs: int,
                    rates: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Each fp32 path's arithmetic rate against the fastest fp32 GEMM measured in the same run
    (over sizes and libraries: the practical fp32 ceiling of this machine at this thread count),
    and what the fp32 target asks of onnxruntime in those terms."""
    peak = max(r for by_lib in rates.values() for r in by_lib.values())
    flop_per_image = 2.0 * macs
    ceiling = peak * 1e9 / flop_per_image
    paths = {}
    for label, s in summary.items():
        if "fp32" not in label:
            continue  # int8 runs other instructions; the fp32 GEMM rate does not bound it
        rate = s["images_per_s_median"] * flop_per_image / 1e9
        paths[label] = {"gflop_per_s": rate, "share_of_gemm_peak": rate / peak}
    torch_ips = summary["torch eager fp32"]["images_per_s_median"]
    needed = TARGETS["onnxruntime_fp32_vs_torch"] * torch_ips
    return {"macs_per_image": macs,
            "gemm_gflop_per_s": {str(n): by_lib for n, by_lib in rates.items()},
            "gemm_peak_gflop_per_s": peak, "fp32_ceiling_images_per_s": ceiling,
            "paths": paths,
            "fp32_target_images_per_s": needed, "fp32_target_share_of_gemm_peak": needed / ceiling,
            "note": "images/s x 2 x multiply-adds of the ONNX graph (convolutions and matrix "
                    "products) against the best fp32 n x n GEMM of torch and onnxruntime at the "
                    "same thread count"}


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


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for label, rs in rows.items():
        ips = [r["images_per_s"] for r in rs]
        ranked = sorted(rs, key=lambda r: r["images_per_s"])
        median_row = ranked[(len(ranked) - 1) // 2]  # the lower middle for an even count
        out[label] = {"images_per_s_median": statistics.median(ips),
                      "images_per_s_best": max(ips), "images_per_s_rounds": ips,
                      "latency_ms_median_round": median_row["latency_ms"],
                      "calls_per_round": [r["count"] for r in rs]}
    base = out["torch eager fp32"]
    for s in out.values():
        s["vs_torch_median"] = s["images_per_s_median"] / base["images_per_s_median"]
        s["vs_torch_best"] = s["images_per_s_best"] / base["images_per_s_best"]
    return out


# ----------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def oecl_command() -> list[str]:
    exe = Path(sys.executable).with_name("oecl")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "oecl_runtime"]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"oecl serve exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"oecl serve did not answer /healthz within {timeout:.0f} s")


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def batches_formed(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The server's batch-size histogram over the timed requests only (after - before)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    prefix = 'oecl_batch_size_bucket{le="'
    bounds = sorted((float(k[len(prefix):-2]), v) for k, v in d.items() if k.startswith(prefix))
    dist, prev_bound, prev_cum = [], 0.0, 0.0
    for bound, cum in bounds:
        if cum - prev_cum:
            lo = int(prev_bound) + 1
            hi = "inf" if bound == float("inf") else int(bound)
            dist.append({"sizes": f"{lo}" if lo == hi else f"{lo}-{hi}",
                         "batches": int(cum - prev_cum)})
        prev_bound, prev_cum = bound, cum
    n, images = d.get("oecl_batch_size_count", 0.0), d.get("oecl_batch_size_sum", 0.0)
    busy = d.get("oecl_inference_seconds_sum", 0.0)
    return {"batches": int(n), "images": int(images), "mean": images / n if n else None,
            "distribution": dist, "inference_seconds": busy,
            "images_per_inference_second": images / busy if busy else None}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    if proc.poll() is not None:
        return {"signal": None, "exited": True, "exit_code": proc.returncode,
                "note": "had already exited"}
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
        return {"signal": "SIGTERM", "exited": True, "exit_code": code,
                "seconds_to_exit": round(time.perf_counter() - t0, 3)}
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"signal": "SIGTERM", "exited": False, "exit_code": None,
                "note": f"still running {timeout:.0f} s after SIGTERM; killed"}


def time_http(artifact: Artifact, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = ["--host", "127.0.0.1", "--port", str(port), "--backend", "onnxruntime-cpu",
               "--precision", args.serve_precision, "--max-batch", str(args.max_batch),
               # info: uvicorn's lifecycle lines (no per-request lines: the access log is off)
               # show in the log whether the shutdown was the graceful one.
               "--max-delay-ms", str(args.max_delay_ms), "--log-level", "info"]
    cmd = [*oecl_command(), "serve", "--model", str(artifact.directory), *options]
    log(f"HTTP: oecl serve {' '.join(options)}")
    with tempfile.TemporaryDirectory(prefix="oecl-bench-runtime.") as tmp:
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "wb") as server_log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=server_log,
                                    stderr=subprocess.STDOUT)
        try:
            startup = wait_healthy(url, proc, log_path, timeout=180)
            runtime = _server_runtime(url)
            bodies = request_images(artifact.spec, count=min(args.requests, 256))
            warm = [bodies[i % len(bodies)] for i in range(args.http_warmup)]
            warm_replies, _ = asyncio.run(B.http_load(url, warm, args.concurrency,
                                                      time_limit_s=args.http_time_limit))
            timed = [bodies[i % len(bodies)] for i in range(args.requests)]
            log(f"HTTP: {len(warm)} warm-up, then {len(timed)} timed one-image requests at "
                f"concurrency {args.concurrency} ...")
            before, server_cpu0, client_cpu0 = scrape(url), cpu_seconds(proc.pid), \
                time.process_time()
            replies, wall = asyncio.run(B.http_load(url, timed, args.concurrency,
                                                    time_limit_s=args.http_time_limit))
            client_cpu = time.process_time() - client_cpu0
            server_cpu = cpu_seconds(proc.pid) - server_cpu0
            after = scrape(url)
        finally:
            stopped = stop(proc)
            server_log_text = log_path.read_text(errors="replace")
    # uvicorn logs these after the lifespan shutdown (the batcher drained) and as its last
    # words; since 0.29 it then re-raises the signal, so the exit status is -SIGTERM.
    stopped["application_shutdown_complete"] = "Application shutdown complete" in server_log_text
    stopped["finished_server_process"] = "Finished server process" in server_log_text
    stopped["graceful"] = bool(stopped["exited"] and stopped["application_shutdown_complete"]
                               and stopped["finished_server_process"])
    ok = [r.seconds for r in replies if r.status == 200]
    statuses = Counter(str(r.status) for r in replies)
    row = {"requests": len(timed), "answered": len(replies), "ok": len(ok),
           "failures": len(timed) - len(ok), "status_counts": dict(statuses),
           "warmup_requests": len(warm),
           "warmup_failures": sum(r.status != 200 for r in warm_replies),
           "seconds": wall, "images_per_s": len(ok) / wall if wall > 0 else 0.0,
           "latency_ms": B.latency_stats(ok)}
    cores = os.cpu_count() or 1
    return {
        "url": "http://127.0.0.1:<free port>", "serve_options": options[4:],
        "server_runtime": runtime, "startup_seconds": round(startup, 2),
        "concurrency": args.concurrency, "images_per_request": 1, "body": "PNG",
        "result": row, "batches": batches_formed(before, after),
        "cpu": {"cores": cores, "server_cpu_seconds": server_cpu, "client_cpu_seconds": client_cpu,
                "server_cores_busy": server_cpu / wall if wall else None,
                "client_cores_busy": client_cpu / wall if wall else None,
                "note": "load client (this process) and server share the same cores"},
        "shutdown": stopped,
        "server_log_tail": server_log_text[-2000:]
        if not stopped["graceful"] or row["failures"] else "",
    }


# ----------------------------------------------------------------------------- report


def _fmt_ms(lat: dict[str, float], key: str) -> str:
    return f"{lat[key]:.1f}"


def markdown(rep: dict[str, Any]) -> str:
    ip, http = rep["in_process"]["summary"], rep["http"]
    files = {label: f for label, f in rep["in_process"]["files"].items()}
    n = rep["settings"]["rounds"]
    lines = [
        f"{rep['device']}; torch {rep['versions'].get('torch')}, onnxruntime "
        f"{rep['versions'].get('onnxruntime')}; {rep['threads']['used']} intra-op threads for "
        f"torch and onnxruntime; model {rep['model']['architecture_label']}, "
        f"{rep['model']['input']} uint8 in; server on uvicorn {rep['http_stack']['uvicorn']} "
        f"({rep['http_stack']['http']}, {rep['http_stack']['loop']}).",
        "",
        f"| path | file | images/s (median of {n}) | rounds | p50 ms | p99 ms | "
        "vs torch eager fp32 |",
        # latency: per run() call of a whole batch in process, per request over HTTP
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for label, s in ip.items():
        rounds = " / ".join(f"{x:.1f}" for x in s["images_per_s_rounds"])
        lat = s["latency_ms_median_round"]
        lines.append(f"| {label}, batch {rep['settings']['batch']} | {files[label]} | "
                     f"{s['images_per_s_median']:.1f} | {rounds} | {_fmt_ms(lat, 'p50')} | "
                     f"{_fmt_ms(lat, 'p99')} | {s['vs_torch_median']:.2f}x |")
    r = http["result"]
    torch_ips = ip["torch eager fp32"]["images_per_s_median"]
    lines.append(
        f"| HTTP `oecl serve` ({http['server_runtime'].get('name')} "
        f"{http['server_runtime'].get('precision')}), 1 image/request, concurrency "
        f"{http['concurrency']} | {http['served_file']} | {r['images_per_s']:.1f} | "
        f"{r['ok']}/{r['requests']} ok | {_fmt_ms(r['latency_ms'], 'p50')} | "
        f"{_fmt_ms(r['latency_ms'], 'p99')} | {r['images_per_s'] / torch_ips:.2f}x |")
    c = rep["compute_ceiling"]
    gemm = "; ".join(f"{n}^3 " + ", ".join(f"{k} {v:.0f}" for k, v in by_lib.items())
                     for n, by_lib in c["gemm_gflop_per_s"].items())
    shares = "; ".join(f"{label} {p['gflop_per_s']:.0f} GFLOP/s = "
                       f"{100 * p['share_of_gemm_peak']:.0f}%" for label, p in c["paths"].items())
    lines += ["", f"Compute ceiling: {c['macs_per_image'] / 1e6:.1f} M multiply-adds per image; "
              f"fp32 GEMM GFLOP/s: {gemm}; the best, {c['gemm_peak_gflop_per_s']:.0f}, allows "
              f"at most {c['fp32_ceiling_images_per_s']:.0f} fp32 images/s. Share of that GEMM "
              f"rate: {shares}. The fp32 target asks for "
              f"{c['fp32_target_images_per_s']:.0f} images/s, "
              f"{100 * c['fp32_target_share_of_gemm_peak']:.0f}% of the GEMM rate.",
              "", f"onnxruntime fp32 per layer (its profiler, batch {rep['settings']['batch']}; "
              "profiling slows every layer alike, so compare rows, not the GEMM rate):",
              "", "| convolution | input HxW | output CxHxW | nodes | ms per batch | GFLOP/s |",
              "|---|---|---|---:|---:|---:|"]
    for g in c["onnxruntime_fp32_layers"]:
        lines.append(f"| {g['kernel']} | {g['input_hw']} | {g['output_chw']} | {g['nodes']} | "
                     f"{1000 * g['seconds']:.1f} | {g['gflop_per_s']:.0f} |")
    tr = rep["model"]["training"]
    if tr is not None:
        auroc = "-" if tr["test_AUROC"] is None else f"{tr['test_AUROC']:.4f}"
        lines += ["", f"Trained here: {tr['config']['steps']} steps of "
                  f"{tr['config']['batch_size']} ID + OE images in {tr['seconds']:.0f} s "
                  f"(test AUROC by norm, bf16: {auroc})."]
    ver = rep["export_verification"]
    if ver.get("available"):
        f32, i8 = ver["files"].get("model.onnx", {}), ver["files"].get("model.int8.onnx", {})
        lines += ["", f"Export verification ({ver['n_id']} ID + {ver['n_ood']} OOD held-out "
                  f"images): PyTorch fp32 AUROC {ver['reference']['AUROC']:.4f}; model.onnx max "
                  f"relative norm difference {f32.get('max_rel_diff', float('nan')):.1e}; "
                  f"model.int8.onnx AUROC {i8.get('AUROC', float('nan')):.4f} (difference "
                  f"{i8.get('AUROC_diff', float('nan')):.4f})"
                  + (f"; the exporter refused it: {ver['exporter_refused']}"
                     if ver["exporter_refused"] else "") + "."]
    b = http["batches"]
    dist = ", ".join(f"{d['sizes']}: {d['batches']}" for d in b["distribution"])
    cpu = http["cpu"]
    lines += [
        "",
        f"Server batches over the timed requests: {b['batches']} batches, mean "
        f"{b['mean'] or 0:.1f} images ({dist}). In-process {http['served_label']} at batch "
        f"{http['in_process_at_formed_batch']['batch']}: "
        f"{http['in_process_at_formed_batch']['images_per_s']:.1f} images/s. CPU during the "
        f"timed requests: server {cpu['server_cores_busy'] or 0:.2f} cores, load client "
        f"{cpu['client_cores_busy'] or 0:.2f} cores, of {cpu['cores']} shared.",
        "",
        "| target | measured | goal | result |",
        "|---|---:|---:|---|",
    ]
    for t in rep["targets"]:
        result = {True: "pass", False: "FAIL", None: "not measured"}[t["pass"]]
        lines.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {result} |")
    return "\n".join(lines)


def _shutdown_text(s: dict[str, Any]) -> str:
    if not s["exited"]:
        return "did not exit"
    how = "graceful" if s["graceful"] else "no shutdown lines in its log"
    return f"exit status {s['exit_code']} after {s.get('seconds_to_exit', '-')} s, {how}"


def targets(rep: dict[str, Any]) -> list[dict[str, Any]]:
    ip, http, ver = rep["in_process"]["summary"], rep["http"], rep["export_verification"]
    fp32, int8 = ip["onnxruntime fp32"], ip["onnxruntime int8"]
    out = [
        {"name": "onnxruntime fp32 / torch eager fp32 (images/s, median rounds)",
         "measured": f"{fp32['vs_torch_median']:.2f}x",
         "goal": f">= {TARGETS['onnxruntime_fp32_vs_torch']}x",
         "pass": fp32["vs_torch_median"] >= TARGETS["onnxruntime_fp32_vs_torch"]},
        {"name": "onnxruntime int8 / torch eager fp32 (images/s, median rounds)",
         "measured": f"{int8['vs_torch_median']:.2f}x",
         "goal": f">= {TARGETS['onnxruntime_int8_vs_torch']}x",
         "pass": int8["vs_torch_median"] >= TARGETS["onnxruntime_int8_vs_torch"]},
    ]
    int8_file = ver.get("files", {}).get("model.int8.onnx") if ver.get("available") else None
    out.append({
        "name": "int8 AUROC vs PyTorch fp32 (export verification; absolute difference)",
        "measured": "-" if int8_file is None else
        f"{int8_file['AUROC']:.4f} vs {ver['reference']['AUROC']:.4f} "
        f"(diff {int8_file['AUROC_diff']:.4f})",
        "goal": f"<= {TARGETS['int8_auroc_diff']}",
        "pass": None if int8_file is None
        else int8_file["AUROC_diff"] <= TARGETS["int8_auroc_diff"],
    })
    ratio = http["vs_in_process_best_batch"]
    out += [
        {"name": f"HTTP images/s / in-process best batch-{rep['settings']['batch']} round, "
                 f"{http['served_label']}",
         "measured": f"{ratio:.2f}", "goal": f">= {TARGETS['http_vs_in_process']}",
         "pass": ratio >= TARGETS["http_vs_in_process"]},
        {"name": "HTTP failed requests (non-200 or unsent)",
         "measured": str(http["result"]["failures"]), "goal": "0",
         "pass": http["result"]["failures"] == 0},
        {"name": "server exits on SIGTERM (graceful: lifespan shutdown logged)",
         "measured": _shutdown_text(http["shutdown"]), "goal": "exits gracefully",
         "pass": bool(http["shutdown"]["graceful"])},
    ]
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    torch_default = torch.get_num_threads()
    ort_default = ort_default_threads()
    threads = args.threads or ort_default or len(os.sched_getaffinity(0))
    # Same intra-op parallelism for both libraries, so the ratios compare the engines.
    torch.set_num_threads(threads)

    train_info: dict[str, Any] | None = None
    failure: str | None = None
    if args.artifact is not None:
        artifact_dir = args.artifact
        verify_path = artifact_dir / "verify.json"
        report = json.loads(verify_path.read_text()) if verify_path.is_file() else None
    else:
        if args.run is not None:
            run_dir = args.run
        else:
            run_dir, train_info = train(args)
        artifact_dir = args.work_dir / f"{run_dir.name}-model"
        log(f"exporting {run_dir.name} to ONNX fp32 + int8 with verification ...")
        report, failure = export(run_dir, artifact_dir)
    artifact = Artifact.open(artifact_dir)
    spec = artifact.spec
    chw = (spec.channels, spec.height, spec.width)
    arch = artifact.meta.get("architecture", {})
    if artifact.max_batch < max(args.batch, args.max_batch):
        raise SystemExit(f"the artifact was exported for batches up to {artifact.max_batch}, "
                         f"below --batch {args.batch} / --max-batch {args.max_batch}")

    backends = open_backends(artifact, threads)
    files = {label: artifact.require(fmt, prec)["path"]
             for label, (_, fmt, prec) in BACKENDS.items()}
    log(f"in process, batch {args.batch}, {threads} threads: {args.rounds} rounds of "
        f"{args.warmup} warm-up + up to {args.iterations} timed calls (or {args.max_seconds} s)")
    agree = parity(backends, chw, args.batch)
    rows = rotated_rounds({label: b.run for label, b in backends.items()}, chw, args.batch,
                          args.rounds, args.iterations, args.warmup, args.max_seconds,
                          args.pause, log)
    summary = summarise(rows)
    time.sleep(args.pause)
    fp32_onnx = artifact.path_of(artifact.require("onnx", "fp32"))
    macs = graph_macs(fp32_onnx)
    rates = {n: fp32_matmul_rates(threads, n, repeats=5) for n in args.gemm_sizes}
    ceiling = compute_ceiling(summary, macs, rates)
    ceiling["onnxruntime_fp32_layers"] = ort_layer_profile(fp32_onnx, threads, chw, args.batch)
    log("fp32 GEMM GFLOP/s: " + "; ".join(
        f"{n}^3 " + ", ".join(f"{k} {v:.0f}" for k, v in by_lib.items())
        for n, by_lib in rates.items()) + f"; {macs / 1e6:.1f} M multiply-adds per image -> "
        f"fp32 ceiling {ceiling['fp32_ceiling_images_per_s']:.0f} images/s")

    served_label = f"onnxruntime {args.serve_precision}"
    for label in [k for k in backends if k != served_label]:
        backends.pop(label).close()  # only the served backend is timed again below
    http = time_http(artifact, args)
    # The same backend in process at the batch size the server formed on average (after the
    # server has stopped, so nothing else runs): what batching alone costs or gains.
    formed = http["batches"]["mean"]
    formed_bs = int(min(args.max_batch, max(1, round(formed)))) if formed else args.batch
    time.sleep(args.pause)
    at_formed = B.bench_backend(backends[served_label].run, chw, [formed_bs],
                                iterations=args.iterations, warmup=args.warmup,
                                max_seconds=args.max_seconds)[0]
    backends[served_label].close()
    best = summary[served_label]["images_per_s_best"]
    http.update({
        "served_label": served_label, "served_file": files[served_label],
        "in_process_best_batch_images_per_s": best,
        "vs_in_process_best_batch": http["result"]["images_per_s"] / best,
        "in_process_at_formed_batch": {"batch": formed_bs,
                                       "images_per_s": at_formed["images_per_s"],
                                       "latency_ms": at_formed["latency_ms"]},
        "vs_in_process_at_formed_batch":
            http["result"]["images_per_s"] / at_formed["images_per_s"],
        "denominator": f"target ratio: HTTP images/s over the best of the {args.rounds} "
                       f"in-process batch-{args.batch} rounds of {served_label} (same file, "
                       "same thread count); also given: over one in-process timing at the "
                       "server's mean formed batch size, taken after the server stopped",
    })

    info = B.device_info()
    rep: dict[str, Any] = {
        "benchmark": "runtime-throughput",
        "quick": args.quick,
        "date": started.date().isoformat(),
        "command": "python benchmarks/bench_runtime.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "device": device_name("cpu"),
        "versions": {**info["versions"], "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "http_stack": http_stack(),
        "platform": info["platform"],
        "threads": {"used": threads, "torch_default": torch_default,
                    "onnxruntime_default": ort_default,
                    "torch_set_to": torch.get_num_threads(),
                    "onnxruntime_in_process_intra_op": threads,
                    "server": "onnxruntime default intra-op threads (oecl serve without --threads)",
                    "note": "torch and onnxruntime in process run with the same intra-op thread "
                            "count; the HTTP load client and the server share the cores"},
        "load_average_at_start": load_at_start,
        "model": {"architecture": arch,
                  "architecture_label": f"{arch.get('depth')} width {arch.get('width')} "
                                        f"{arch.get('stem')} stem",
                  "input": f"{spec.channels}x{spec.height}x{spec.width}",
                  "artifact": artifact_dir.name, "source": artifact.meta.get("source"),
                  "files": {f["path"]: {"format": f["format"], "precision": f["precision"],
                                        "bytes": f["bytes"]} for f in artifact.files},
                  "training": train_info},
        "export_verification": verify_summary(report, failure),
        "settings": {k: getattr(args, k) for k in (
            "batch", "rounds", "iterations", "warmup", "max_seconds", "pause", "serve_precision",
            "concurrency", "requests", "http_warmup", "http_time_limit", "max_batch",
            "max_delay_ms", "gemm_sizes")},
        "timing": "oecl_runtime.bench.bench_backend (time.perf_counter per run() call; warm-up "
                  "excluded) on one random uint8 batch (seed 0) shared by all backends; rounds "
                  "rotate the order; images/s of the median round",
        "in_process": {"files": files, "agreement_on_timed_batch": agree, "summary": summary,
                       "rounds": rows},
        "compute_ceiling": ceiling,
        "http": http,
        "targets_goals": TARGETS,
    }
    rep["targets"] = targets(rep)
    rep["all_pass"] = all(t["pass"] is True for t in rep["targets"])

    out = args.out / ("runtime-cpu-quick.json" if args.quick else "runtime-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rep)
    print(markdown(rep))
    where = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    print(f"\nwrote {where}; targets met: {sum(t['pass'] is True for t in rep['targets'])} of "
          f"{len(rep['targets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
