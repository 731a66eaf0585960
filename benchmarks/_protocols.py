"""The protocol rows of bench_serve.py: the same uint8 images through `oecl serve`'s /v1 (.npy
body), /v2 (JSON and binary tensors) and gRPC, and through Triton Inference Server's Python
backend running oecl_runtime (HTTP binary and gRPC), K images per request.

HTTP load comes from `wrk`; gRPC load from `grpc_load` (grpc.aio with a pre-serialised request,
in its own process), the same client for both gRPC servers. Server CPU time is read from /proc
for the server's whole process tree (Triton's Python backend runs its model in a child stub).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / os.sysconf("SC_CLK_TCK")
        todo += children.get(p, [])
    return total


def bodies(images: np.ndarray, input_name: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    """(body, headers) per HTTP form, all carrying `images` (uint8 NCHW)."""
    buf = io.BytesIO()
    np.save(buf, images)
    tensor = {"name": input_name, "datatype": "UINT8", "shape": list(images.shape)}
    outputs = [{"name": "norm", "parameters": {"binary_data": True}}]
    head = json.dumps({"inputs": [{**tensor, "parameters": {
        "binary_data_size": images.nbytes}}], "outputs": outputs}).encode()
    as_json = json.dumps({"inputs": [{**tensor, "data": images.ravel().tolist()}],
                          "outputs": [{"name": "norm"}]}).encode()
    return {"v1": (buf.getvalue(), {"Content-Type": "application/x-npy"}),
            "v2-json": (as_json, {"Content-Type": "application/json"}),
            "v2-binary": (head + images.tobytes(), {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(head))})}


def wrk_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    path.with_suffix(".body").write_bytes(body)
    lines = ['wrk.method = "POST"', f'local f = io.open("{path.with_suffix(".body")}", "rb")',
             'wrk.body = f:read("*a")', "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def grpc_request(images: np.ndarray, input_name: str, model: str) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="UINT8", shape=list(images.shape))
    req.outputs.add(name="norm")
    req.raw_input_contents.append(images.tobytes())
    return req.SerializeToString()


async def _grpc_load(url: str, request: bytes, concurrency: int, seconds: float
                     ) -> dict[str, Any]:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        latencies: list[float] = []
        failures = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await call(request)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"requests_per_s": len(latencies) / elapsed, "requests": len(latencies),
            "failures": failures,
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) if len(lat) else None
                           for q in (50, 90, 99)}}


def grpc_drive(url: str, request: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """`_grpc_load` in a child process (its CPU is the client's, not the server's)."""
    code = ("import sys, json, asyncio; sys.path.insert(0, sys.argv[1]); import _protocols as p;"
            "req = open(sys.argv[3], 'rb').read();"
            "print(json.dumps(asyncio.run(p._grpc_load(sys.argv[2], req, int(sys.argv[4]), "
            "float(sys.argv[5])))))")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"grpc-request-{os.getpid()}.bin"
    path.write_bytes(request)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), url,
                              str(path), str(concurrency), str(seconds)],
                             capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink(missing_ok=True)
    return json.loads(out)
