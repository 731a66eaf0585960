"""A live server under slow and vanishing clients: header and body timeouts (408), a gone
client's images leave the queue and its decode stops, bodies still arriving bounded in bytes
and requests past their body in number; a lone request skips the batching delay; --workers
share one port and their metrics."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images, worker_pids
from image_bodies import encoded, npy

from oecl_runtime import Scorer
from oecl_runtime.batcher import DynamicBatcher
from oecl_runtime.inputs import Abandoned, to_batch
from oecl_runtime.preprocess import InputSpec
from oecl_runtime.serving.app import create_app
from oecl_runtime.serving.config import BatchPolicy, ProcessConfig, ServerConfig

# ----------------------------------------------------------------------------- batching


def test_a_lone_request_does_not_wait_for_the_batch_delay() -> None:
    runs: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        runs.append(len(batch))
        return np.ones(len(batch), np.float32)

    b = DynamicBatcher(run, (1, 2, 2), BatchPolicy(max_batch=8, max_delay_ms=2000.0, max_queue=64))
    b.start()

    async def one() -> float:
        t0 = time.perf_counter()
        await b.submit(np.zeros((1, 1, 2, 2), np.uint8))
        return time.perf_counter() - t0

    try:
        waited = asyncio.run(one())
    finally:
        b.close()
    assert waited < 0.5 and runs == [1]  # the old batcher held it for the whole 2 s


def test_decoding_stops_when_the_caller_goes_away() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(Abandoned):
        to_batch(np.zeros((10, 64, 64, 3), np.uint8), InputSpec(32, 32, 3, resize=32), stop=stop)


# ----------------------------------------------------------------------------- live uvicorn


@contextlib.contextmanager
def _in_thread(scorer: Scorer, cfg: ServerConfig) -> Iterator[tuple[int, object]]:
    """The real server (uvicorn and its limits) on a free port, in a thread of this process."""
    import uvicorn

    from oecl_runtime.serving.process import _uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(scorer, cfg)
    server = uvicorn.Server(_uvicorn_config(app, cfg, ProcessConfig(port=port,
                                                                   log_level="warning")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def live(scorer: Scorer) -> Iterator[tuple[int, object]]:
    cfg = ServerConfig(BatchPolicy(max_queue=256), header_timeout_s=0.5, body_timeout_s=0.5,
                       graceful_timeout_s=5)
    with _in_thread(scorer, cfg) as served:
        yield served


def _post_and_leave(port: int, body: bytes, started: list) -> None:
    """POST an .npy body, wait until its work has `started` (up to 10 s), then hang up."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)


def _reply(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_slow_headers_get_408(live: tuple[int, object]) -> None:
    port, _ = live
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHo")  # and then nothing more
        reply = _reply(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"headers" in reply
        assert time.perf_counter() - t0 < 3.0
    with socket.create_connection(("127.0.0.1", port)) as s:  # a silent connection too
        assert _reply(s).startswith(b"HTTP/1.1 408")


def test_short_body_gets_408_and_the_connection_closes(live: tuple[int, object]) -> None:
    port, app = live
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        reply = _reply(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"body" in reply
    # A normal request right after still works (keep-alive on a fresh connection).
    png = png_bytes(random_images(1)[0])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(png)).encode() + b"\r\n\r\n" + png)
        assert _reply(s).startswith(b"HTTP/1.1 200")
    assert 'reason="timeout"' in app.metrics.render().decode()  # type: ignore[attr-defined]


def test_gone_client_stops_a_large_request(live: tuple[int, object],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import oecl_runtime.serving.v1 as server_mod

    port, app = live
    real = server_mod.to_batch
    ran: list[int] = []

    def slow_to_batch(*args, stop: threading.Event, **kw):  # a decode that takes 10 s
        for i in range(1000):
            ran.append(i)
            if stop.is_set():
                raise Abandoned
            time.sleep(0.01)
        return real(*args, stop=stop, **kw)

    monkeypatch.setattr(server_mod, "to_batch", slow_to_batch)
    # NHWC: needs decoding
    _post_and_leave(port, npy(np.zeros((40, 64, 64, 3), np.uint8)), ran)
    deadline = time.monotonic() + 10
    metrics = app.metrics  # type: ignore[attr-defined]
    while 'reason="client_gone"' not in metrics.render().decode():
        assert time.monotonic() < deadline, "decoding went on for a client that had gone"
        time.sleep(0.05)
    assert len(ran) < 500


# ----------------------------------------------------------------------------- --workers


def test_serving_threads_share_the_cores_among_workers() -> None:
    from oecl_runtime.serving.process import serving_threads

    assert serving_threads(1, cores=2) == 2 and serving_threads(2, cores=2) == 1
    assert serving_threads(1, cores=16) == 16 and serving_threads(4, cores=16) == 4
    assert serving_threads(3, cores=2) == 1


def test_workers_share_one_port_and_metrics_count_all_of_them(artifact_dir: Path) -> None:
    import os
    import re
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oecl_runtime", "serve", "--model", str(artifact_dir), "--port",
         str(port), "--workers", "2", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        worker_pids(url, 2)  # both workers up
        png = png_bytes(random_images(1)[0])
        for _ in range(30):
            urllib.request.urlopen(urllib.request.Request(url + "/v1/score", data=png),
                                   timeout=10).read()
        for _ in range(6):  # whichever worker answers the scrape, it counts both
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                text = r.read().decode()
            got = re.search(r'^oecl_requests_total\{code="200",path="/v1/score"\} (\S+)$', text,
                            re.M)
            assert got and float(got.group(1)) == 30, text[:2000]
            assert re.search(r"^oecl_workers 2\.0$", text, re.M)
            assert re.search(r"^oecl_images_total 30\.0$", text, re.M)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_gone_client_leaves_the_queue(live: tuple[int, object],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    port, app = live
    batcher = app.batcher  # type: ignore[attr-defined]
    real, ran = batcher._run, []

    def slow_run(batch: np.ndarray) -> np.ndarray:
        ran.append(len(batch))
        time.sleep(0.1)
        return real(batch)

    monkeypatch.setattr(batcher, "_run", slow_run)
    # model form: straight to the queue
    _post_and_leave(port, npy(np.zeros((256, 3, 32, 32), np.uint8)), ran)
    time.sleep(1.5)  # 8 batches of 32 would take 0.8 s
    assert 0 < sum(ran) < 256, ran
    assert batcher.depth == 0


def test_bodies_still_arriving_are_bounded_in_bytes(scorer: Scorer) -> None:
    # 64 requests x 1 MB / 8: 8 MB of bodies may be arriving at once.
    cfg = ServerConfig(BatchPolicy(max_queue=16), max_body_mb=1, body_timeout_s=20,
                       graceful_timeout_s=5)
    with _in_thread(scorer, cfg) as (port, app):
        _bounded_bodies(port, app)


def _bounded_bodies(port: int, app) -> None:
    uploads = []
    try:
        for _ in range(10):  # 10 x 0.95 MB sent, the last bytes held back
            u = socket.create_connection(("127.0.0.1", port))
            uploads.append(u)
            try:  # the total is looked at as each body streams in
                u.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 1000000\r\n\r\n" + b"\0" * 950_000)
            except ConnectionResetError:
                pass
        time.sleep(0.5)
        turned_away = 0
        for u in uploads:  # answered 503 and closed; the close may reach the client as a reset
            try:
                reply = _reply(u, 1.0)
            except ConnectionResetError:
                reply = b"reset"
            assert reply == b"" or reply == b"reset" or reply.startswith(b"HTTP/1.1 503"), reply
            if reply:
                assert reply == b"reset" or b"bytes of request bodies in progress" in reply
                turned_away += 1
        assert 0 < turned_away < 10  # those under the limit were left to finish their bodies
        busy = re.search(r'^oecl_errors_total\{reason="busy"\} (\S+)$',
                         app.metrics.render().decode(), re.M)
        assert busy and float(busy.group(1)) == turned_away
        png = png_bytes(random_images(1)[0])
        with socket.create_connection(("127.0.0.1", port)) as s:  # a normal client is served
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: " + str(len(png)).encode() + b"\r\n\r\n" + png)
            assert _reply(s).startswith(b"HTTP/1.1 200")
    finally:
        for u in uploads:
            u.close()


def test_score_requests_past_their_body_are_limited(scorer: Scorer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests being decoded (or queued) count against `max_requests`; one more gets 503."""
    import oecl_runtime.serving.v1 as server_mod

    release = asyncio.Event()

    async def held(fn, *args, **kw):  # every off-loop decode waits for the test
        await release.wait()
        return fn(*args, **kw)

    monkeypatch.setattr(server_mod, "run_in_threadpool", held)
    app = create_app(scorer, ServerConfig(BatchPolicy(max_queue=16)))
    limit = 64  # max_requests: max(64, 2 x max_queue)
    big = encoded(np.random.default_rng(9).integers(0, 256, (200, 200, 3), np.uint8), "PNG")
    assert len(big) > 64 * 1024  # decoded off the event loop

    async def post() -> int:
        sent, status = False, []

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": big, "more_body": False}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])

        await app({"type": "http", "method": "POST", "path": "/v1/score", "query_string": b"",
                   "headers": []}, receive, send)
        return status[0]

    async def run() -> tuple[list[int], int]:
        app.batcher.start()
        try:
            waiting = [asyncio.ensure_future(post()) for _ in range(limit)]
            await asyncio.sleep(0.2)
            # All `limit` are decoding: turned away at once (the old server had it wait).
            extra = await asyncio.wait_for(post(), 5)
            release.set()
            return await asyncio.gather(*waiting), extra
        finally:
            app.batcher.close()

    statuses, extra = asyncio.run(run())
    assert extra == 503 and statuses.count(200) > limit // 2
    assert 'oecl_errors_total{reason="busy"} 1.0' in app.metrics.render().decode()
