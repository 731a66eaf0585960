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
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _ceiling import compute_ceiling, fp32_matmul_rates, gemm_text
from _harness import RESULTS, command_line, device_name, log, shown
from _ort_profile import ort_default_threads, ort_layer_profile
from _runtime_report import TARGETS, markdown, targets
from _server_process import batches_formed, oecl_serve, scrape
from _timing import rotated_rounds

from oecl_runtime import Artifact
from oecl_runtime import bench as B
from oecl_runtime.atomic import write_json
from oecl_runtime.backends import Backend, open_backend
from oecl_runtime.backends.ort import OnnxRuntimeBackend
from oecl_runtime.bench import request_images, server_runtime
from oecl_runtime.flops import graph_macs
from oecl_runtime.serving.process import http_stack

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
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.rounds, args.iterations, args.concurrency, args.requests) < 1:
        p.error("--batch, --rounds, --iterations, --concurrency and --requests must be >= 1")
    return args


# ----------------------------------------------------------------------------- the model


def train(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """A short run of the project's own training on 32x32 RGB; returns (run dir, summary)."""
    from oecl_train.config import TrainConfig
    from oecl_train.training import run_training

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


def time_http(artifact: Artifact, args: argparse.Namespace) -> dict[str, Any]:
    options = ["--backend", "onnxruntime-cpu", "--precision", args.serve_precision,
               "--max-batch", str(args.max_batch),
               # info: uvicorn's lifecycle lines (no per-request lines: the access log is off)
               # show in the log whether the shutdown was the graceful one.
               "--max-delay-ms", str(args.max_delay_ms), "--log-level", "info"]
    log(f"HTTP: oecl serve {' '.join(options)}")
    with oecl_serve(artifact.directory, options) as server:
        url = server.url
        runtime = server_runtime(url)
        bodies = request_images(artifact.spec, count=min(args.requests, 256))
        warm = [bodies[i % len(bodies)] for i in range(args.http_warmup)]
        warm_replies, _ = asyncio.run(B.http_load(url, warm, args.concurrency,
                                                  time_limit_s=args.http_time_limit))
        timed = [bodies[i % len(bodies)] for i in range(args.requests)]
        log(f"HTTP: {len(warm)} warm-up, then {len(timed)} timed one-image requests at "
            f"concurrency {args.concurrency} ...")
        before, server_cpu0, client_cpu0 = scrape(url), server.cpu_seconds(), time.process_time()
        replies, wall = asyncio.run(B.http_load(url, timed, args.concurrency,
                                                time_limit_s=args.http_time_limit))
        client_cpu = time.process_time() - client_cpu0
        server_cpu = server.cpu_seconds() - server_cpu0
        after = scrape(url)
    stopped = server.shutdown
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
        "url": "http://127.0.0.1:<free port>", "serve_options": options,
        "server_runtime": runtime, "startup_seconds": round(server.startup_seconds, 2),
        "concurrency": args.concurrency, "images_per_request": 1, "body": "PNG",
        "result": row, "batches": batches_formed(before, after),
        "cpu": {"cores": cores, "server_cpu_seconds": server_cpu, "client_cpu_seconds": client_cpu,
                "server_cores_busy": server_cpu / wall if wall else None,
                "client_cores_busy": client_cpu / wall if wall else None,
                "note": "load client (this process) and server share the same cores"},
        "shutdown": stopped,
        "server_log_tail": server.log_text[-2000:]
        if not stopped["graceful"] or row["failures"] else "",
    }


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
    fp32_goal = TARGETS["onnxruntime_fp32_vs_torch"] * \
        summary["torch eager fp32"]["images_per_s_median"]
    ceiling = compute_ceiling(summary, macs, rates, fp32_goal)
    ceiling["onnxruntime_fp32_layers"] = ort_layer_profile(fp32_onnx, threads, chw, args.batch)
    log(f"fp32 GEMM GFLOP/s: {gemm_text(rates)}; {macs / 1e6:.1f} M multiply-adds per image -> "
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
        "command": command_line("bench_runtime.py", argv),
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
    write_json(out, rep)
    print(markdown(rep))
    print(f"\nwrote {shown(out)}; targets met: {sum(t['pass'] is True for t in rep['targets'])} of "
          f"{len(rep['targets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
