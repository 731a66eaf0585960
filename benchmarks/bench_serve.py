"""Per-request cost of `oecl serve`, side by side with two bare servers under one load generator.

Servers, each started alone and driven by `wrk` (a C load generator, so the client costs the
machine little) with the same one-image PNG POST at one concurrency level:

- `bare-json`: a starlette app on the same uvicorn stack that answers a constant JSON;
- `bare-decode`: the same app, which also decodes the PNG with Pillow;
- `oecl-serve`: `oecl serve` on the model, with `--workers 1`, and with each N in --workers.

The denominator is the model in-process on the same machine: `Scorer.score` over the same PNG
bodies in batches (decode + inference), and `Scorer.score_array` (inference alone). Rounds are
rotated (in-process and each server once per round) so that load from other jobs spreads over
all of them; the best round of each is reported.

    python benchmarks/bench_serve.py --model model --concurrency 32 --duration 10 --rounds 2

`wrk` comes from Debian's packages (`apt-get install -y wrk`); the script installs it when it
is missing and it runs as root, and otherwise says how.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from _harness import RESULTS, command_line, device_name, log, md_table, shown
from _server_process import Server, oecl_serve, serving

from oecl_runtime.atomic import write_json

# ----------------------------------------------------------------------------- bare servers


def bare_app(decode: bool) -> Any:
    """The comparison servers: starlette on the same uvicorn stack, answering a constant."""
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    answer = {"score": "norm", "direction": "higher_is_normal", "threshold": 1.0,
              "results": [{"norm": 1.0, "is_anomaly": False}]}

    async def score(request: Any) -> JSONResponse:
        body = await request.body()
        if decode:
            Image.open(io.BytesIO(body)).load()
        return JSONResponse(answer)

    async def healthz(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/score", score, methods=["POST"]),
                             Route("/healthz", healthz)])


def run_bare(kind: str, port: int) -> None:
    import uvicorn

    uvicorn.run(bare_app(kind == "bare-decode"), host="127.0.0.1", port=port,
                log_level="warning", access_log=False)


# ----------------------------------------------------------------------------- driving them


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk from Debian's packages")
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
    if not found:
        sys.exit("bench_serve needs wrk: apt-get install -y wrk")
    return found


def wrk_script(body_path: Path) -> Path:
    script = body_path.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body_path}", "rb")\n'
        'wrk.body = f:read("*a")\nf:close()\n'
        'wrk.headers["Content-Type"] = "image/png"\n')
    return script


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {f"p{p}": _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(x) for x in sock.groups()) if sock else 0)
    return {"requests_per_s": rps, "requests": total, "failures": failures, "latency_ms": lat}


def drive(wrk: str, url: str, script: Path, concurrency: int, seconds: float,
          path: str = "/v1/score") -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script),
           url + path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def start(kind: str, args: argparse.Namespace, workers: int
          ) -> AbstractContextManager[Server]:
    timeouts = {"ready_timeout": 60.0, "stop_timeout": 30.0}
    if kind.startswith("bare"):
        return serving(lambda port: [sys.executable, str(Path(__file__).resolve()),
                                     "--serve-bare", kind, "--port", str(port)], **timeouts)
    options = ["--log-level", "warning", "--workers", str(workers)]
    if getattr(args, "grpc_port", 0):
        options += ["--grpc-port", str(args.grpc_port)]
    if args.protocols:
        # Room for every connection's images (Triton's queue has no limit), so that K=16 at
        # concurrency 32 measures work, not 503s.
        options += ["--max-queue", str(max(256, args.concurrency * max(args.images_per_request)))]
    if args.precision:
        options += ["--precision", args.precision]
    if args.threads:
        options += ["--threads", str(args.threads)]
    return oecl_serve(args.model, options, **timeouts)


# ----------------------------------------------------------------------------- in-process


def in_process(args: argparse.Namespace, bodies: list[bytes]) -> dict[str, float]:
    from oecl_runtime import Scorer

    with Scorer.open(args.model, backend="onnxruntime-cpu", precision=args.precision,
                     threads=args.threads) as s:
        spec = s.spec
        batch = np.random.default_rng(1).integers(
            0, 256, (32, spec.channels, spec.height, spec.width), dtype=np.uint8)
        for _ in range(5):
            s.score(bodies[:32])
            s.score_array(batch)
        best_decode = best_infer = 0.0
        for _ in range(3):  # best of three: other jobs on the machine only ever slow it down
            t0 = time.perf_counter()
            s.score(bodies)
            best_decode = max(best_decode, len(bodies) / (time.perf_counter() - t0))
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                s.score_array(batch)
                n += len(batch)
            best_infer = max(best_infer, n / (time.perf_counter() - t0))
    return {"decode_and_score_images_per_s": best_decode, "score_array_images_per_s": best_infer}


def request_bodies(model: Path, count: int) -> list[bytes]:
    """The same distinct PNG bodies `oecl bench --url` sends."""
    from oecl_runtime.artifact import Artifact
    from oecl_runtime.bench import request_images

    return request_images(Artifact.open(model, verify=False).spec, count)


def markdown(report: dict[str, Any]) -> str:
    rows = [[name, f"{s['best_requests_per_s']:.0f}",
             ", ".join(f"{x:.0f}" for x in s["all_requests_per_s"]), f"{s['p99_ms_of_best']:.2f}",
             s["failures"], f"{s['ratio_to_in_process']:.2f}"]
            for name, s in report["servers"].items()]
    return "\n".join(md_table(["server", "best req/s", "all rounds", "p99 ms", "failures",
                               "/ in-process"], rows, "lrlrrr"))


# ----------------------------------------------------------------------------- protocols


def measured(pid: int, run: Any, *run_args: Any) -> dict[str, Any]:
    """`run(*run_args)`'s row with the server's CPU seconds per 1,000 requests during it."""
    from _protocols import tree_cpu_seconds

    cpu0 = tree_cpu_seconds(pid)
    row = run(*run_args)
    row["server_cpu_s_per_1000"] = (tree_cpu_seconds(pid) - cpu0) / max(row["requests"], 1) * 1e3
    return row


def protocol_rows(args: argparse.Namespace, wrk: str) -> dict[str, list[dict[str, Any]]]:
    """`oecl serve` /v1, /v2 JSON, /v2 binary, gRPC; Triton's Python backend running
    oecl_runtime over HTTP (binary) and gRPC; K uint8 images per request."""
    from _protocols import bodies, grpc_drive, grpc_request, wrk_script
    from _tritonserver import free_port, triton_install, tritonserver

    from oecl_runtime.artifact import Artifact
    from oecl_runtime.triton_repo import write_repository

    art = Artifact.open(args.model, verify=False)
    spec, name = art.spec, art.input_name
    triton = triton_install()
    if isinstance(triton, str):
        log(f"no Triton rows: {triton}")
    rows: dict[str, list[dict[str, Any]]] = {}
    infer = "/v2/models/oecl/infer"

    def add(label: str, k: int, r: int, row: dict[str, Any]) -> None:
        row.update(round=r, images_per_request=k)
        rows.setdefault(f"{label}, K={k}", []).append(row)
        log(f"round {r} {label} K={k}: {row['requests_per_s']:.0f} req/s, p50 "
            f"{row['latency_ms'].get('p50', float('nan')):.2f} ms, p99 "
            f"{row['latency_ms'].get('p99', float('nan')):.2f} ms, "
            f"{row['server_cpu_s_per_1000']:.2f} CPU s / 1000 requests, "
            f"{row['failures']} failures")

    extra_workers = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 1]
    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as tmp:
        work = Path(tmp)
        write_repository(args.model, work / "models", backend="python", kind="cpu")
        for k in args.images_per_request:
            images = np.random.default_rng(k).integers(
                0, 256, (k, spec.channels, spec.height, spec.width), dtype=np.uint8)
            forms = {f: wrk_script(work / f"{f}-{k}.lua", *b)
                     for f, b in bodies(images, name).items()}
            request = grpc_request(images, name, "oecl")
            for r in range(args.rounds):
                for workers in [1, *extra_workers]:
                    # With --workers, the forms a cluster client sends (binary tensors, gRPC).
                    label = "oecl serve" if workers == 1 else f"oecl serve x{workers}"
                    grpc_port = free_port()
                    args_grpc = argparse.Namespace(**{**vars(args), "grpc_port": grpc_port})
                    with start("oecl-serve", args_grpc, workers) as server:
                        for form, script in forms.items():
                            if workers > 1 and form != "v2-binary":
                                continue
                            path = "/v1/score" if form == "v1" else infer
                            drive(wrk, server.url, script, args.concurrency, args.warmup, path)
                            add(f"{label} {form}", k, r, measured(
                                server.process.pid, drive, wrk, server.url, script,
                                args.concurrency, args.duration, path))
                        url = f"127.0.0.1:{grpc_port}"
                        grpc_drive(url, request, args.concurrency, args.warmup)
                        add(f"{label} grpc", k, r, measured(
                            server.process.pid, grpc_drive, url, request, args.concurrency,
                            args.duration))
                if isinstance(triton, str):
                    continue
                tw = work / f"triton-{k}-{r}"
                tw.mkdir()
                with tritonserver(work / "models", tw) as t:
                    pid = int(t["pid"])
                    url = "http://" + t["http"]
                    drive(wrk, url, forms["v2-binary"], args.concurrency, args.warmup, infer)
                    add("triton python http", k, r, measured(
                        pid, drive, wrk, url, forms["v2-binary"], args.concurrency,
                        args.duration, infer))
                    grpc_drive(t["grpc"], request, args.concurrency, args.warmup)
                    add("triton python grpc", k, r, measured(
                        pid, grpc_drive, t["grpc"], request, args.concurrency, args.duration))
    return rows


def protocol_markdown(rows: dict[str, list[dict[str, Any]]]) -> str:
    table = []
    for label, rs in rows.items():
        best = max(rs, key=lambda x: x["requests_per_s"])
        lat = best["latency_ms"]
        table.append([label, f"{best['requests_per_s']:.0f}",
                      ", ".join(f"{x['requests_per_s']:.0f}" for x in rs),
                      f"{lat.get('p50', float('nan')):.2f}", f"{lat.get('p99', float('nan')):.2f}",
                      f"{best['server_cpu_s_per_1000']:.2f}", sum(x["failures"] for x in rs)])
    return "\n".join(md_table(["server, images per request", "best req/s", "all rounds",
                               "p50 ms", "p99 ms", "server CPU s / 1000 req", "failures"],
                              table, "lrlrrrr"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", default="2", help="extra `oecl serve --workers` counts")
    p.add_argument("--out", type=Path, default=RESULTS / "serve-cpu.json")
    p.add_argument("--protocols", action="store_true",
                   help="instead: the Open Inference Protocol rows (oecl serve /v1, /v2 JSON, "
                        "/v2 binary, gRPC; Triton's Python backend over HTTP and gRPC)")
    p.add_argument("--images-per-request", type=lambda t: [int(x) for x in t.split(",")],
                   default=[1, 16], help="with --protocols: K uint8 images per request")
    p.add_argument("--serve-bare", choices=["bare-json", "bare-decode"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare:
        run_bare(args.serve_bare, args.port)
        return 0
    if args.model is None:
        p.error("--model is required")
    wrk = ensure_wrk()
    if args.protocols:
        rows = protocol_rows(args, wrk)
        out = (RESULTS / "serve-protocols.json" if args.out == RESULTS / "serve-cpu.json"
               else args.out)
        write_json(out, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "device": device_name("cpu"), "model": str(shown(args.model)),
                         "concurrency": args.concurrency, "duration_s": args.duration,
                         "rows": rows, "command": command_line("bench_serve.py", argv)})
        print(protocol_markdown(rows))
        return 0
    bodies = request_bodies(args.model, 1024)
    refs: list[dict[str, float]] = []
    servers = [("bare-json", 1), ("bare-decode", 1), ("oecl-serve", 1)]
    servers += [("oecl-serve", int(w)) for w in args.workers.split(",") if w.strip() and
                int(w) > 1]
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        body_path = Path(tmp) / "image.png"
        body_path.write_bytes(bodies[0])
        script = wrk_script(body_path)
        for r in range(args.rounds):
            # In-process is measured in every round too, so that it sees the same load from
            # other jobs as the servers around it; the best round of each is compared.
            refs.append(in_process(args, bodies))
            log(f"round {r} in-process: {refs[-1]['decode_and_score_images_per_s']:.0f} "
                f"images/s decode + score, {refs[-1]['score_array_images_per_s']:.0f} "
                "score_array")
            for kind, workers in servers:
                name = kind if kind != "oecl-serve" else f"oecl-serve --workers {workers}"
                with start(kind, args, workers) as server:
                    drive(wrk, server.url, script, args.concurrency, args.warmup)
                    row = drive(wrk, server.url, script, args.concurrency, args.duration)
                row["round"] = r
                rows.setdefault(name, []).append(row)
                log(f"round {r} {name}: {row['requests_per_s']:.0f} req/s, p99 "
                    f"{row['latency_ms'].get('p99', float('nan')):.2f} ms, "
                    f"{row['failures']} failures")
    ref = {k: max(x[k] for x in refs) for k in refs[0]}
    summary = {}
    for name, rs in rows.items():
        best = max(rs, key=lambda x: x["requests_per_s"])
        summary[name] = {"best_requests_per_s": best["requests_per_s"],
                         "all_requests_per_s": [x["requests_per_s"] for x in rs],
                         "p99_ms_of_best": best["latency_ms"].get("p99"),
                         "failures": sum(x["failures"] for x in rs),
                         "ratio_to_in_process": best["requests_per_s"]
                         / ref["decode_and_score_images_per_s"]}
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": device_name("cpu"), "model": str(args.model),
              "precision": args.precision, "concurrency": args.concurrency,
              "duration_s": args.duration, "in_process": ref, "in_process_rounds": refs,
              "servers": summary, "rows": rows,
              "command": command_line("bench_serve.py", argv)}
    write_json(args.out, report)
    print(markdown(report))
    print(f"in-process: {ref['decode_and_score_images_per_s']:.0f} images/s decode + score, "
          f"{ref['score_array_images_per_s']:.0f} images/s score_array; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
