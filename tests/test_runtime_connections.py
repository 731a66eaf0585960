"""`oecl serve` as a real process: idle and slow connections cannot lock clients out, a port in
use is one line, and `--workers` processes end with their supervisor and leave /metrics when
they die."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images, worker_pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fds_for(sockets: int) -> None:
    """Room in this process's open-file limit for `sockets` client sockets (the server
    raises its own limit itself)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = sockets + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"open-file limit {hard} is too low for {sockets} sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextmanager
def _server(artifact_dir: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oecl_runtime", "serve", "--model", str(artifact_dir), "--port",
         str(port), "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if _get(url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _idle(port: int, n: int, stack: ExitStack) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        out.append(s)
    return out


def _slow_body(port: int, n: int, stack: ExitStack) -> list[socket.socket]:
    """Connections whose request headers are in and whose body trickles (has not come)."""
    out = []
    for _ in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n\x89PNG")
        out.append(s)
    return out


def _closed(s: socket.socket) -> bool:
    """Whether the server has closed `s` (reads EOF or a reset; a 503 before it counts too)."""
    s.settimeout(0.05)
    try:
        data = s.recv(65536)
    except TimeoutError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 503")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ----------------------------------------------------------------------------- lock-out


def test_idle_and_slow_sockets_do_not_lock_clients_out(artifact_dir: Path) -> None:
    # --max-queue 16: uvicorn's socket-counting limit was then 64 connections, so the few
    # hundred idle sockets below made every request a 503 for the whole header timeout; and
    # the 100 slow uploads are more than the 64 score requests allowed at once.
    _fds_for(500)
    png = png_bytes(random_images(1, seed=3)[0])
    with _server(artifact_dir, "--max-queue", "16") as (url, _), ExitStack() as stack:
        port = _port(url)
        _slow_body(port, 100, stack)
        _idle(port, 300, stack)
        t0 = time.perf_counter()
        status, body = _get(url + "/healthz", timeout=1)
        assert status == 200, body
        status, body = _post(url + "/v1/score", png, timeout=1)
        assert status == 200, body
        assert json.loads(body)["results"][0]["norm"] > 0
        assert time.perf_counter() - t0 < 1.0


def test_over_the_connection_cap_the_oldest_idle_connection_is_closed(
        artifact_dir: Path) -> None:
    _fds_for(200)
    png = png_bytes(random_images(1, seed=4)[0])
    with _server(artifact_dir, "--max-connections", "50") as (url, _), ExitStack() as stack:
        port = _port(url)
        busy = _slow_body(port, 10, stack)  # requests in progress: never shed
        time.sleep(0.2)
        idle = _idle(port, 100, stack)
        time.sleep(0.3)
        # 110 connections, 50 allowed: the 60 idle longest made way, the 40 newest are open.
        assert [_closed(s) for s in idle] == [True] * 60 + [False] * 40
        assert not any(_closed(s) for s in busy)
        status, body = _post(url + "/v1/score", png, timeout=1)
        assert status == 200, body
        text = _get(url + "/metrics")[1].decode()
        shed = re.search(r'^oecl_connections_closed_total\{reason="shed_idle"\} (\S+)$', text,
                         re.M)
        assert shed and float(shed.group(1)) >= 60, text[-3000:]


# ----------------------------------------------------------------------------- port in use


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_is_one_line_before_starting(artifact_dir: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "oecl_runtime", "serve", "--model", str(artifact_dir),
             "--port", str(port), "--workers", workers],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"Error: port {port} on 127.0.0.1 is in use: pick another with --port"], (
        proc.stderr)


# ----------------------------------------------------------------------------- --workers


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_supervisor(artifact_dir: Path) -> None:
    with _server(artifact_dir, "--workers", "2") as (url, proc):
        workers = worker_pids(url, 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while not all(_gone(p) for p in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.1)
        with socket.socket() as s:  # the port is free for a restart
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", _port(url)))
            s.listen()


def test_a_killed_workers_gauges_leave_the_sums(artifact_dir: Path) -> None:
    import asyncio
    import io
    from concurrent.futures import ThreadPoolExecutor

    from oecl_runtime.bench import http_load

    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    def gauge(text: str, name: str) -> float:
        got = re.search(rf"^{name} (\S+)$", text, re.M)
        assert got, text[-3000:]
        return float(got.group(1))

    # A long batching delay keeps partial batches queued (see the SIGTERM drain test).
    with _server(artifact_dir, "--workers", "2", "--max-delay-ms", "5000", "--max-batch", "16",
                 "--max-queue", "256") as (url, _):
        workers = worker_pids(url, 2)
        bodies = [npy(random_images(37, seed=40 + i).transpose(0, 3, 1, 2).copy())
                  for i in range(6)]
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(asyncio.run, http_load(url, bodies, concurrency=6,
                                                      content_type="application/x-npy"))
            deadline = time.monotonic() + 20
            while gauge(_get(url + "/metrics")[1].decode(), "oecl_queue_depth") < 1:
                assert time.monotonic() < deadline, "requests never reached the queue"
                time.sleep(0.02)
            for pid in workers:  # work queued in them is lost with them
                os.kill(pid, signal.SIGKILL)
            load.result(60)
        worker_pids(url, 2, exclude=frozenset(workers))  # both replaced
        for _ in range(4):  # whichever worker answers the scrape
            text = _get(url + "/metrics")[1].decode()
            assert gauge(text, "oecl_workers") == 2.0
            assert gauge(text, "oecl_queue_depth") == 0.0
