"""Benchmark of the OECL loss: eager dense vs torch.compile vs the fused Triton kernel.

GPU (default):
    python benchmarks/bench_loss.py
times forward, backward and both for the eager dense formula, torch.compile of it, the
Triton kernel and the chunked torch twin at N in {4096, 16384, 65536}, d = 128, in the two
configurations training runs the loss in: fp32 inputs with TF32 products ("fp32-tf32": the
trainer calls the loss on z.float() with TF32 on by default) and bf16; "fp32" (exact
products, --no-tf32) on request. Median of triton.testing.do_bench, and peak memory beyond
the inputs (torch.cuda.max_memory_allocated after a reset). Configurations that run out of
memory are recorded as "oom". The JSON is rewritten after every configuration (and each row
appended to --jsonl), so a run cut short keeps what it measured.

CPU:
    python benchmarks/bench_loss.py --device cpu
times the eager dense formula against the chunked twin at N in {1024, 4096} (the Triton
kernel runs on CPU only in triton's interpreter, whose timings mean nothing). Each
configuration runs in a fresh process so that its peak resident memory can be read back.

Results go to benchmarks/results/loss-<device>.json and a CSV beside it, and a markdown
table is printed. The eager baseline keeps the similarity matmul in the input dtype and
upcasts for the log-sum-exp (what autocast does), so bf16 speedups are not measured against
an fp32 matmul.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _gpu_env import append_jsonl, gpu_environment
from _harness import RESULTS, command_line, device_name, log, md_table, shown

from kernels import ntxent_oe, ntxent_oe_dense, ntxent_oe_torch
from kernels._common import DEFAULT_CHUNK
from oecl_runtime.atomic import atomic_path, write_json

MODES = ("fwd", "bwd", "fwd+bwd")
GPU_IMPLS = ("eager", "compile", "triton", "twin")
CPU_IMPLS = ("eager", "twin")
GPU_SIZES = (4096, 16384, 65536)
CPU_SIZES = (1024, 4096)
# Input dtype and torch's float32 matmul precision ("high" allows TF32, in torch's products
# and in the kernel's, which follows it; see kernels.ntxent_oe_triton.dot_precision).
DTYPES = {"fp32-tf32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_PRECISION = {"fp32-tf32": "high", "fp32": "highest", "bf16": "highest"}
GPU_DTYPES = ("fp32-tf32", "bf16")
CPU_DTYPES = ("fp32",)
TEMPERATURE = 0.5
ALPHA = 1.0
MIB = 1 << 20


_EAGER = functools.partial(ntxent_oe_dense, temperature=TEMPERATURE, alpha=ALPHA, upcast=False)


@functools.cache
def _compiled(dtype_name: str) -> Callable:
    # One compiled function per dtype for all sizes: the second size recompiles with a
    # dynamic N (torch's automatic dynamic shapes) and later sizes reuse that, which keeps
    # cold compiles to two per dtype on a machine that starts with an empty cache.
    return torch.compile(_EAGER)


def _loss_fn(impl: str, dtype_name: str = "fp32") -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if impl == "eager":
        return _EAGER
    if impl == "compile":
        return _compiled(dtype_name)
    if impl == "triton":
        return functools.partial(ntxent_oe, temperature=TEMPERATURE, alpha=ALPHA,
                                 backend="triton")
    if impl == "twin":
        return functools.partial(ntxent_oe_torch, temperature=TEMPERATURE, alpha=ALPHA,
                                 chunk=DEFAULT_CHUNK)
    raise ValueError(impl)


def _inputs(n: int, d: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    z_id = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
    # OE batch as large as one view, the usual OECL setting.
    z_oe = torch.randn(n // 2, d, generator=g, device=device).to(dtype).requires_grad_()
    return z_id, z_oe


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _record(impl, mode, dtype_name, n, d, ms=None, mib=None, status="ok", note=""):
    return {"impl": impl, "mode": mode, "dtype": dtype_name, "n": n, "d": d,
            "matmul_precision": MATMUL_PRECISION[dtype_name],
            "median_ms": None if ms is None else round(ms, 4),
            "peak_extra_mib": None if mib is None else round(mib, 2),
            "status": status, "note": note}


# ---------------------------------------------------------------------------------- GPU


def _cuda_peak(fn: Callable[[], Any]) -> float:
    """Peak bytes allocated by fn beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def _bench_gpu_config(impl: str, n: int, d: int, dtype_name: str,
                      modes: tuple[str, ...] = MODES) -> list[dict]:
    from triton.testing import do_bench

    dtype = DTYPES[dtype_name]
    torch.set_float32_matmul_precision(MATMUL_PRECISION[dtype_name])
    fn = _loss_fn(impl, dtype_name)
    rows = []
    try:
        z_id, z_oe = _inputs(n, d, dtype, "cuda")
        grads = [z_id, z_oe]

        def fwd():
            return fn(z_id, z_oe)

        def fwd_bwd():
            fn(z_id, z_oe).loss.backward()

        fwd_bwd()  # compile / autotune / allocator warm-up
        for t in grads:
            t.grad = None
        results = {}
        if "fwd" in modes:
            results["fwd"] = (do_bench(fwd, return_mode="median"), _cuda_peak(fwd))
        if "bwd" in modes:
            held = [fwd()]  # the graph the backward-only timing replays

            def bwd():
                held[0].loss.backward(retain_graph=True)

            bwd_peak = _cuda_peak(bwd)
            results["bwd"] = (do_bench(bwd, grad_to_none=grads, return_mode="median"),
                              bwd_peak)
            held.clear()
            for t in grads:
                t.grad = None
        if "fwd+bwd" in modes:
            fb_peak = _cuda_peak(fwd_bwd)
            results["fwd+bwd"] = (do_bench(fwd_bwd, grad_to_none=grads, return_mode="median"),
                                  fb_peak)
        for mode in modes:
            ms, mib = results[mode]
            rows.append(_record(impl, mode, dtype_name, n, d, ms, mib))
    except Exception as exc:  # an OOM may arrive wrapped by the compiler
        # Any other failure is recorded too, and the other configurations still run: the
        # one GPU run must return every number it can.
        status = "oom" if _is_oom(exc) else "error"
        note = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        rows = [_record(impl, mode, dtype_name, n, d, status=status, note=note)
                for mode in modes]
    finally:
        torch.cuda.empty_cache()
    return rows


def run_gpu(sizes, dtypes, impls, d, modes=MODES,
            done: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        for n in sizes:
            for impl in impls:
                got = _bench_gpu_config(impl, n, d, dtype_name, modes)
                rows += got
                done(got)
                r = rows[-1]
                log(f"  {dtype_name} N={n} {impl}: {r['mode']} "
                    f"{r['median_ms'] if r['status'] == 'ok' else r['status']} ms")
    return rows


# ---------------------------------------------------------------------------------- CPU


def _median_ms(fn: Callable[[], Any], reps: int, reset: Callable[[], None],
               min_total_s: float = 2.0) -> float:
    # At least `reps` runs and at least min_total_s of them: a median over a couple of
    # seconds rides out other processes sharing the cores.
    reset()
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_total_s:
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cpu_worker(impl: str, n: int, d: int, dtype_name: str, reps: int, threads: int) -> list:
    """One configuration in a fresh process, so ru_maxrss is this configuration's peak."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    fn = _loss_fn(impl, dtype_name)
    # Library warm-up (thread pools, kernels' first-call buffers) at a size whose own
    # footprint is negligible, before the high-water mark is read.
    w_id, w_oe = _inputs(256, d, dtype, "cpu")
    fn(w_id, w_oe).loss.backward()
    z_id, z_oe = _inputs(n, d, dtype, "cpu")
    del w_id, w_oe

    def reset():
        z_id.grad = z_oe.grad = None

    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(z_id, z_oe).loss.backward()
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024

    fwd_ms = _median_ms(lambda: fn(z_id, z_oe), reps, reset)
    held = [fn(z_id, z_oe)]  # the graph the backward-only timing replays
    bwd_ms = _median_ms(lambda: held[0].loss.backward(retain_graph=True), reps, reset)
    held.clear()
    fb_ms = _median_ms(lambda: fn(z_id, z_oe).loss.backward(), reps, reset)
    # Peak resident memory is read once, for forward + backward (the training step).
    return [
        _record(impl, "fwd", dtype_name, n, d, fwd_ms),
        _record(impl, "bwd", dtype_name, n, d, bwd_ms),
        _record(impl, "fwd+bwd", dtype_name, n, d, fb_ms, peak_mib,
                note="peak = growth of peak RSS beyond the inputs"),
    ]


def run_cpu(sizes, dtypes, impls, d, reps, threads,
            done: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for dtype_name in dtypes:
        for n in sizes:
            for impl in impls:
                with ctx.Pool(1) as pool:
                    got = pool.apply(_cpu_worker, (impl, n, d, dtype_name, reps, threads))
                rows += got
                done(got)
                log(f"  {dtype_name} N={n} {impl}: fwd+bwd {got[-1]['median_ms']} ms")
    return rows


# ------------------------------------------------------------------------------- output


def _cell(rows_by_key, key) -> str:
    r = rows_by_key.get(key)
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].upper()
    cell = f"{r['median_ms']:.3f} ms"
    if r["peak_extra_mib"] is not None:
        cell += f" / {r['peak_extra_mib']:.1f} MiB"
    return cell


def markdown_table(rows: list[dict], impls) -> str:
    by_key = {(r["impl"], r["mode"], r["dtype"], r["n"]): r for r in rows}
    configs = sorted({(r["dtype"], r["n"]) for r in rows}, key=lambda c: (c[0], c[1]))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    speed_cols = [i for i in ("eager", "compile") if i in impls and "triton" in impls]
    fast = "triton" if "triton" in impls else "twin"
    if fast == "twin":
        speed_cols = ["eager"]
    head = ["dtype", "N", "mode", *impls, *[f"{fast} vs {i}" for i in speed_cols]]
    rows_out = []
    for dtype_name, n in configs:
        for mode in modes:
            cells = [_cell(by_key, (i, mode, dtype_name, n)) for i in impls]
            ratios = []
            for base in speed_cols:
                a, b = by_key.get((fast, mode, dtype_name, n)), by_key.get(
                    (base, mode, dtype_name, n))
                if a and b and a["status"] == b["status"] == "ok" and a["median_ms"]:
                    ratios.append(f"{b['median_ms'] / a['median_ms']:.2f}x")
                else:
                    ratios.append("-")
            rows_out.append([dtype_name, n, mode, *cells, *ratios])
    return "\n".join(md_table(head, rows_out))


def _device_slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", help="N values (default by device)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                   help=f"default: {' '.join(GPU_DTYPES)} on a GPU, {' '.join(CPU_DTYPES)} "
                   "on the CPU")
    p.add_argument("--impls", nargs="+", help="subset of the implementations")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="GPU: which passes to time")
    p.add_argument("--jsonl", type=Path, default=None,
                   help="also append every measured row to this file as it is made")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="CPU repetitions per timing")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: torch's); 1 is steadier on shared cores")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        log("bench_loss.py: no CUDA device; the Triton kernel benchmark needs a GPU "
            "(--device cpu compares eager dense with the chunked twin on CPU)")
        return 2
    impls = tuple(args.impls or (GPU_IMPLS if args.device == "cuda" else CPU_IMPLS))
    allowed = GPU_IMPLS if args.device == "cuda" else CPU_IMPLS
    if not set(impls) <= set(allowed):
        p.error(f"--impls for {args.device} must be among {allowed}")
    sizes = args.sizes or (GPU_SIZES if args.device == "cuda" else CPU_SIZES)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (GPU_DTYPES if args.device == "cuda" else CPU_DTYPES)
    if args.device == "cpu" and "fp32-tf32" in dtypes:
        p.error("fp32-tf32 needs a GPU (no TF32 on a CPU)")
    threads = torch.get_num_threads()
    started = dt.datetime.now(dt.timezone.utc)
    device = device_name(args.device)
    meta = {
        "device": device,
        "date": started.date().isoformat(),
        "command": command_line("bench_loss.py", argv),
        "environment": gpu_environment() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cpu_threads": threads,
        # Other processes on the machine skew wall-clock timings; recorded for context.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "oe_rows": "N/2",
        "timing": "triton.testing.do_bench median" if args.device == "cuda"
        else f"median of >= {args.reps} runs spanning >= 2 s (time.perf_counter)",
        "memory": "torch.cuda.max_memory_allocated beyond the inputs" if args.device == "cuda"
        else "growth of peak RSS beyond the inputs, fwd+bwd only",
    }
    json_path = args.out_dir / f"loss-{_device_slug(args.device)}.json"
    rows: list[dict] = []

    def done(got: list[dict]) -> None:
        rows.extend(got)
        write_json(json_path, {"meta": meta, "complete": False, "results": rows})
        for r in got:
            append_jsonl(args.jsonl, {"bench": "loss", "device": device, **r})

    if args.device == "cuda":
        run_gpu(sizes, dtypes, impls, args.d, tuple(args.modes), done)
        meta["triton_kernels"] = kernel_resources()
    else:
        run_cpu(sizes, dtypes, impls, args.d, args.reps, threads, done)
    write_json(json_path, {"meta": meta, "complete": True, "results": rows})
    csv_path = json_path.with_suffix(".csv")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)

    print(f"device: {device}; torch {torch.__version__}; d={args.d}")
    print(markdown_table(rows, impls))
    print(f"\nwrote {shown(json_path)} and {csv_path.name}")
    failed = [r for r in rows if r["status"] == "error"]
    for r in failed:
        log(f"bench_loss.py: {r['impl']} {r['dtype']} N={r['n']} {r['mode']} failed: {r['note']}")
    return 1 if failed else 0


def kernel_resources() -> list[dict]:
    """Registers, spills, shared memory, warps and stages of every loss kernel compiled in
    this process, as the loaded kernels report them (what ptxas did on this GPU)."""
    from kernels import ntxent_oe_triton as K

    out = []
    for name in ("_row_norm_kernel", "_ntxent_fwd_kernel", "_ntxent_bwd_kernel",
                 "_oe_grad_kernel"):
        for entry in getattr(getattr(K, name), "device_caches", {}).values():
            for kernel in (entry[0] if isinstance(entry, tuple) else entry).values():
                md = kernel.metadata
                signature = getattr(getattr(kernel, "src", None), "signature", None) or {}
                out.append({"kernel": name.strip("_"), "inputs": next(iter(signature.values()),
                                                                       None),
                            "num_warps": md.num_warps, "num_stages": md.num_stages,
                            "shared": md.shared, "n_regs": getattr(kernel, "n_regs", None),
                            "n_spills": getattr(kernel, "n_spills", None)})
    return out


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
