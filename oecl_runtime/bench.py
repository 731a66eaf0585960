"""Throughput and latency: the backend alone over batch sizes, and a running server over
concurrency levels (one image per request). Warm-up calls are never counted.

The HTTP load client is plain asyncio over keep-alive connections, one per concurrent client,
so that on a small box the client costs far less CPU than the server it measures.
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from . import __version__
from .atomic import with_file, write_json, write_text

# ----------------------------------------------------------------------------- statistics


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """min/mean/p50/p90/p95/p99/max of a list of durations, in milliseconds."""
    if not seconds:
        return {k: float("nan") for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"min": float(ms.min()), "mean": float(ms.mean()), "p50": float(p50),
            "p90": float(p90), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


# ----------------------------------------------------------------------------- device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def device_info() -> dict[str, Any]:
    """Where the numbers came from: CPU, GPU, and the versions of what ran the model."""
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "oecl_runtime": __version__}
    for mod in ("onnxruntime", "tensorrt", "torch"):
        # Only report libraries already loaded by the backend: importing torch here just to
        # print its version would defeat the torch-free runtime.
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpus": _gpu_names(),
            "platform": platform.platform(), "versions": versions}


# ----------------------------------------------------------------------------- backend sweep


def bench_backend(
    run: Any,
    item_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    iterations: int = 50,
    warmup: int = 5,
    max_seconds: float = 10.0,
    progress: Any = None,
    macs_per_image: int | None = None,
) -> list[dict[str, Any]]:
    """Time `run(uint8 NCHW)` per batch size; at most `iterations` calls or `max_seconds` each.

    With `macs_per_image` (see `oecl_runtime.flops.graph_macs`), each row also gives the
    arithmetic rate reached, `gflop_per_s` (2 FLOPs per multiply-accumulate).
    """
    rng = np.random.default_rng(0)
    rows = []
    for bs in batch_sizes:
        batch = rng.integers(0, 256, (bs, *item_shape), dtype=np.uint8)
        for _ in range(warmup):
            run(batch)
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds
        while len(times) < iterations and (not times or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - t0)
        total = float(np.sum(times))
        rows.append({"mode": "backend", "batch_size": bs, "concurrency": None,
                     "count": len(times), "errors": 0, "seconds": total,
                     "images_per_s": bs * len(times) / total, "latency_ms": latency_stats(times)})
        if macs_per_image:
            rows[-1]["gflop_per_s"] = 2e-9 * macs_per_image * rows[-1]["images_per_s"]
        if progress is not None:
            progress(rows[-1])
    return rows


# ----------------------------------------------------------------------------- HTTP load


class HTTPClientError(RuntimeError):
    pass


def check_loopback_url(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http:// URL that points at this machine, else ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load tests only target this machine (127.0.0.1/localhost), not {host}")
    return host, parts.port or 80, parts.path.rstrip("/")


@dataclass
class Reply:
    index: int
    status: int
    seconds: float
    body: bytes


class _Connection:
    """One keep-alive HTTP/1.1 connection: send a POST, read a Content-Length response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                await self._open()
            assert self.reader is not None and self.writer is not None
            head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
            self.writer.write(head.encode("latin-1") + body)
            try:
                await self.writer.drain()
                status_line = await self.reader.readline()
            except ConnectionError:
                status_line = b""
            if status_line:
                break
            # The server closed an idle keep-alive connection before reading: reconnect once.
            await self.close()
            if attempt:
                raise HTTPClientError("server closed the connection without answering")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPClientError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        length, close = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value == "close":
                close = True
            elif name == "transfer-encoding" and value != "identity":
                raise HTTPClientError("chunked responses are not supported by this client")
        data = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, data


async def http_load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    content_type: str = "image/png",
    time_limit_s: float = 60.0,
) -> tuple[list[Reply], float]:
    """POST each body once to `url` from `concurrency` connections; (replies, wall seconds).

    Requests are bounded by `len(bodies)` and by `time_limit_s` (no new request after it);
    replies keep the index of their body, so callers can match answers to inputs.
    """
    host, port, prefix = check_loopback_url(url)
    path = prefix + "/v1/score"
    indices = iter(range(len(bodies)))
    replies: list[Reply] = []
    deadline = time.perf_counter() + time_limit_s

    async def client() -> None:
        conn = _Connection(host, port)
        try:
            for i in indices:
                if time.perf_counter() > deadline:
                    break
                t0 = time.perf_counter()
                try:
                    status, data = await conn.post(path, bodies[i], content_type)
                except (OSError, asyncio.IncompleteReadError, HTTPClientError) as e:
                    status, data = 0, str(e).encode()
                    await conn.close()
                replies.append(Reply(i, status, time.perf_counter() - t0, data))
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, concurrency))))
    return replies, time.perf_counter() - t0


def bench_http(
    url: str,
    bodies: Sequence[bytes],
    concurrencies: Sequence[int],
    requests: int,
    warmup: int = 20,
    time_limit_s: float = 60.0,
    content_type: str = "image/png",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """One image per request; per concurrency level a warm-up round, then `requests` timed."""
    rows = []
    for c in concurrencies:
        pick = [bodies[i % len(bodies)] for i in range(max(warmup, c))]
        asyncio.run(http_load(url, pick, c, content_type, time_limit_s))
        pick = [bodies[i % len(bodies)] for i in range(requests)]
        replies, wall = asyncio.run(http_load(url, pick, c, content_type, time_limit_s))
        ok = [r.seconds for r in replies if r.status == 200]
        rows.append({"mode": "http", "batch_size": 1, "concurrency": c, "count": len(replies),
                     "errors": len(replies) - len(ok), "seconds": wall,
                     "images_per_s": len(ok) / wall if wall > 0 else 0.0,
                     "latency_ms": latency_stats(ok)})
        if progress is not None:
            progress(rows[-1])
    return rows


def request_images(spec: Any, count: int) -> list[bytes]:
    """Distinct PNG images of the model's input size, so no cache can flatter the numbers."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        arr = rng.integers(0, 256, (spec.height, spec.width, spec.channels), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if spec.channels == 1 else arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def server_runtime(url: str) -> dict[str, Any]:
    """The server's own account of its backend and batching, recorded beside its numbers."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/model", timeout=10) as r:
            return json.loads(r.read()).get("runtime", {})
    except OSError as e:
        raise HTTPClientError(f"cannot reach the server at {url}: {e}") from None


# ----------------------------------------------------------------------------- reports

CSV_FIELDS = ("mode", "batch_size", "concurrency", "count", "errors", "seconds", "images_per_s",
              "gflop_per_s", "lat_min_ms", "lat_mean_ms", "lat_p50_ms", "lat_p90_ms", "lat_p95_ms",
              "lat_p99_ms", "lat_max_ms")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in CSV_FIELDS if k in row}
    for k, v in row["latency_ms"].items():
        out[f"lat_{k}_ms"] = round(v, 4)
    out["images_per_s"] = round(row["images_per_s"], 2)
    if "gflop_per_s" in row:
        out["gflop_per_s"] = round(row["gflop_per_s"], 2)
    out["seconds"] = round(row["seconds"], 4)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("mode", "batch", "conc", "n", "err", "img/s", "GFLOP/s", "min", "mean", "p50", "p90",
            "p95", "p99")
    lines = ["  ".join(f"{h:>8}" for h in head) + "   (latency in ms)"]
    for r in rows:
        lat = r["latency_ms"]
        rate = f"{r['gflop_per_s']:.1f}" if "gflop_per_s" in r else "-"
        cells = [r["mode"], r["batch_size"], r["concurrency"] or "-", r["count"], r["errors"],
                 f"{r['images_per_s']:.1f}", rate, *(f"{lat[k]:.2f}" for k in
                                                     ("min", "mean", "p50", "p90", "p95", "p99"))]
        lines.append("  ".join(f"{c!s:>8}" for c in cells))
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], titles: dict[str, str], path: Path) -> None:
    # matplotlib is optional (the train extra); the backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, x, [r for r in rows if r["mode"] == m])
              for m, x in (("backend", "batch_size"), ("http", "concurrency"))]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (mode, key, rs) in zip(axes[0], panels, strict=True):
        xs = [r[key] for r in rs]
        ax.plot(xs, [r["images_per_s"] for r in rs], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("batch size" if key == "batch_size" else "concurrent requests")
        ax.set_ylabel("throughput (images/s)", color="tab:blue")
        # Both axes from 0: an axis cut at the data's minimum turns a 5% change into a cliff.
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["latency_ms"]["p99"] for r in rs], "s--", color="tab:red")
        ax2.set_ylabel("p99 latency (ms)", color="tab:red")
        ax2.set_ylim(bottom=0)
        ax.set_title(titles[mode], fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Path]:
    """bench.json (everything), bench.csv (one row per measurement) and bench.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "png": out / "bench.png"}
    write_json(paths["json"], report)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in report["results"]:
        w.writerow(_flat(row))
    write_text(paths["csv"], buf.getvalue())
    dev = report["device"]
    where = dev["gpus"][0] if dev["gpus"] else dev["cpu"][:40]
    b, s = report["backend"], report.get("server") or report["backend"]
    titles = {"backend": f"backend alone: {b['name']} {b['precision']} on {where}",
              "http": f"HTTP, 1 image/request: {s['name']} {s['precision']} on {where}"}
    _plot(report["results"], titles, paths["png"])
    return paths
