"""`oecl serve`: HTTP behaviour through starlette's TestClient, then a real uvicorn under load
and a SIGTERM drain in a subprocess."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images
from starlette.testclient import TestClient

from oecl_runtime import Backend, Scorer
from oecl_runtime.bench import http_load
from oecl_runtime.serving.app import create_app
from oecl_runtime.serving.config import BatchPolicy, ServerConfig


@pytest.fixture(scope="module")
def client(scorer: Scorer) -> Iterator[TestClient]:
    cfg = ServerConfig(BatchPolicy(max_delay_ms=2.0, max_queue=64), max_body_mb=0.25)
    with TestClient(create_app(scorer, cfg)) as c:
        yield c


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- TestClient


def test_raw_image_body(client: TestClient, scorer: Scorer) -> None:
    img = random_images(1, seed=21)[0]
    r = client.post("/v1/score", content=png_bytes(img), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score"] == "norm" and body["direction"] == "higher_is_normal"
    want = scorer.score(img)[0]
    (res,) = body["results"]
    assert res["norm"] == pytest.approx(want.norm, rel=1e-4)
    assert res["is_anomaly"] == want.is_anomaly and body["threshold"] == scorer.threshold


def test_multipart_many_images_keep_order_and_names(client: TestClient, scorer: Scorer) -> None:
    imgs = random_images(5, seed=22)
    files = [("images", (f"img{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(imgs)]
    r = client.post("/v1/score", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [f"img{i}.png" for i in range(5)]
    want = [x.norm for x in scorer.score(list(imgs))]
    np.testing.assert_allclose([x["norm"] for x in results], want, rtol=1e-4)


def test_npy_bodies(client: TestClient, scorer: Scorer) -> None:
    imgs = random_images(3, seed=23)
    want = [x.norm for x in scorer.score(imgs)]
    nchw = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))  # already 32x32: model form
    for arr in (imgs, nchw):
        r = client.post("/v1/score", content=_npy(arr),
                        headers={"content-type": "application/x-npy"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["norm"] for x in r.json()["results"]], want, rtol=1e-4)
    gray = np.asarray(imgs[0].mean(axis=2), dtype=np.uint8)  # HW
    r = client.post("/v1/score", content=_npy(gray), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_threshold_query_overrides(client: TestClient) -> None:
    img = png_bytes(random_images(1, seed=24)[0])
    norm = client.post("/v1/score", content=img).json()["results"][0]["norm"]
    r = client.post(f"/v1/score?threshold={norm + 1}", content=img).json()
    assert r["threshold"] == pytest.approx(norm + 1) and r["results"][0]["is_anomaly"] is True
    r = client.post(f"/v1/score?threshold={norm - 1}", content=img).json()
    assert r["results"][0]["is_anomaly"] is False
    bad = client.post("/v1/score?threshold=abc", content=img)
    assert bad.status_code == 400 and "threshold" in bad.json()["error"]


def test_bad_requests_are_400_with_reason(client: TestClient) -> None:
    r = client.post("/v1/score", content=b"\x89PNG but not really")
    assert r.status_code == 400 and "cannot decode" in r.json()["error"]
    r = client.post("/v1/score", content=b"")
    assert r.status_code == 400 and "empty body" in r.json()["error"]
    r = client.post("/v1/score", content=b"garbage", headers={"content-type": "application/x-npy"})
    assert r.status_code == 400 and ".npy" in r.json()["error"]
    r = client.post("/v1/score", content=_npy(np.zeros((4, 4, 3), np.float32)),
                    headers={"content-type": "application/x-npy"})
    assert r.status_code == 400 and "uint8" in r.json()["error"]
    files = [("a", ("a.png", png_bytes(random_images(1)[0]), "image/png")),
             ("b", ("b.png", b"broken", "image/png"))]
    r = client.post("/v1/score", files=files)
    # One unreadable part costs its own entry, named by its filename; the rest are scored.
    assert r.status_code == 200, r.text
    good, bad = r.json()["results"]
    assert good["name"] == "a.png" and isinstance(good["norm"], float)
    assert bad["name"] == "b.png" and "cannot decode b.png" in bad["error"] and "norm" not in bad
    r = client.post("/v1/score", files=[files[1]])
    assert r.status_code == 400 and "b.png" in r.json()["error"]


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    r = client.get("/v1/score")
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["allow"] == "POST"
    r = client.get("/no/such/path")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "Not Found"
    r = client.post("/healthz")
    assert r.status_code == 405 and "error" in r.json()


def test_body_over_limit_is_413(client: TestClient) -> None:
    big = b"\0" * (300 * 1024)  # limit is 0.25 MB
    r = client.post("/v1/score", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for _ in range(10):
            yield b"\0" * (64 * 1024)

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413


def test_healthz_model_and_metrics(client: TestClient, scorer: Scorer) -> None:
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["schema_version"] == scorer.meta["schema_version"]
    assert m["score"]["direction"] == "higher_is_normal"
    assert m["runtime"]["name"] == "onnxruntime-cpu" and m["runtime"]["max_queue"] == 64
    client.post("/v1/score", content=b"broken")
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    body = text.text
    for needle in ('oecl_requests_total{code="200",path="/v1/score"}',
                   'oecl_errors_total{reason="bad_image"}', 'oecl_batch_size_bucket{le="+Inf"}',
                   "oecl_queue_depth 0.0", 'oecl_request_latency_seconds_bucket{le="0.005"}',
                   "oecl_images_total", 'oecl_model_info{backend="onnxruntime-cpu"'):
        assert needle in body, needle


class _GatedBackend(Backend):
    """Wraps a backend; each run waits for the test to open the gate."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.precision = inner, "gated", inner.precision
        self.max_batch = 1
        self.entered, self.gate = threading.Event(), threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.run(batch)


class _FailingBackend(Backend):
    name, precision, max_batch = "failing", "fp32", 8

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")


def test_full_queue_is_503_with_retry_after(scorer: Scorer) -> None:
    gated = _GatedBackend(scorer.backend)
    app = create_app(Scorer(scorer.artifact, gated),
                     ServerConfig(BatchPolicy(max_queue=1, max_delay_ms=0)))
    img = png_bytes(random_images(1, seed=25)[0])
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/score", content=img)
        assert gated.entered.wait(10)  # first request is inside the backend
        second = pool.submit(c.post, "/v1/score", content=img)
        deadline = time.monotonic() + 10
        while app.state.batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # second request is waiting in the queue
        r = c.post("/v1/score", content=img)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queue full" in r.json()["error"]
        gated.gate.set()
        assert first.result(10).status_code == 200 and second.result(10).status_code == 200
        assert 'oecl_errors_total{reason="queue_full"} 1' in c.get("/metrics").text


def test_backend_failure_is_500_and_server_survives(scorer: Scorer) -> None:
    app = create_app(Scorer(scorer.artifact, _FailingBackend()))
    img = png_bytes(random_images(1)[0])
    with TestClient(app) as c:
        for _ in range(2):
            r = c.post("/v1/score", content=img)
            assert r.status_code == 500 and "device lost" in r.json()["error"]
        assert c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- live servers


def test_live_uvicorn_under_concurrent_load(scorer: Scorer) -> None:
    import uvicorn

    port = _free_port()
    app = create_app(scorer, ServerConfig(BatchPolicy(max_delay_ms=5.0, max_queue=256)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "server did not start"
        n = 300
        imgs = random_images(n, seed=26)
        bodies = [png_bytes(im) for im in imgs]
        replies, wall = asyncio.run(http_load(f"http://127.0.0.1:{port}", bodies, concurrency=32,
                                              time_limit_s=60))
        assert len(replies) == n
        assert sorted(r.index for r in replies) == list(range(n)), "dropped or duplicated"
        assert all(r.status == 200 for r in replies), {r.status for r in replies}
        got = np.array([json.loads(r.body)["results"][0]["norm"] for r in
                        sorted(replies, key=lambda r: r.index)])
        want = np.array([x.norm for x in scorer.score(list(imgs))])
        np.testing.assert_allclose(got, want, rtol=1e-4)
        batches = app.state.metrics.batch_count()
        assert batches < n, "concurrent requests should have been batched together"
        print(f"\n{n} requests in {wall:.2f}s ({n / wall:.0f}/s), {batches} batches")
    finally:
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive(), "server did not stop"


def test_sigterm_drains_in_flight_requests(artifact_dir: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # A long batching delay keeps requests queued while SIGTERM arrives. Work that finds the
    # inference thread idle runs at once, so the requests carry 37 images each in batches of
    # at most 16: a partial batch is left over, waiting out the delay, queued.
    cmd = [sys.executable, "-m", "oecl_runtime", "serve", "--model", str(artifact_dir),
           "--port", str(port), "--max-delay-ms", "1500", "--max-batch", "16",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not come up: " + proc.stderr.read1().decode())
        bodies = [_npy(random_images(37, seed=27 + i).transpose(0, 3, 1, 2).copy())
                  for i in range(5)]
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(asyncio.run, http_load(url, bodies, concurrency=5,
                                                      content_type="application/x-npy"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
                    depth = re.search(r"^oecl_queue_depth (\S+)$", r.read().decode(), re.M)
                    if depth and float(depth.group(1)) >= 1:
                        break
                time.sleep(0.02)
            else:
                pytest.fail("requests never reached the queue")
            proc.send_signal(signal.SIGTERM)
            replies, _ = load.result(30)
        assert sorted(r.index for r in replies) == list(range(5))
        assert all(r.status == 200 for r in replies), [(r.status, r.body) for r in replies]
        # A drained SIGTERM is a normal stop.
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_http_stack_names_what_uvicorn_will_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md
    import importlib.util

    from oecl_runtime.serving.process import http_stack

    real = md.version
    installed = http_stack()
    if importlib.util.find_spec("httptools") is not None:
        assert installed["http"] == f"httptools {real('httptools')}"

    def without_c_extensions(dist: str) -> str:
        if dist in ("httptools", "uvloop"):
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", without_c_extensions)
    stack = http_stack()
    assert (stack["http"], stack["loop"]) == ("h11", "asyncio")
    assert stack["uvicorn"] == real("uvicorn")
