"""`oecl serve` speaks the Open Inference Protocol (KServe v2 REST): the real tritonclient
against a real server process, then the protocol's error cases through starlette's TestClient."""

from __future__ import annotations

import io
import json
import re
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import nchw_images, png_bytes, random_images, worker_pids
from live_servers import free_port, oecl_serve
from oip_client import check_server, connect, encoded, infer
from PIL import Image
from starlette.testclient import TestClient

from oecl_runtime import Scorer
from oecl_runtime.serving.app import create_app
from oecl_runtime.serving.config import BatchPolicy, ServerConfig

pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with oecl_serve(artifact_dir, log, "--model-name", "digits", "--max-delay-ms", "1000",
                    "--max-batch", "8", "--max-body-mb", "1",
                    "--grpc-port", str(GRPC_PORT)) as url:
        yield url


def test_tritonclient_against_oecl_serve(server: str, scorer: Scorer) -> None:
    assert check_server("http", server, "digits") == {
        "live": True, "ready": True, "model_ready": True, "inputs": ["image_bytes", "images"],
        "outputs": ["is_anomaly", "norm"]}
    c = connect("http", server)
    batch = nchw_images(5, seed=3)
    want = scorer.score_array(batch)
    for binary in (True, False):
        out = infer(c, "http", "digits", "images", batch, binary=binary)
        assert out["norm"].dtype == np.float32 and out["norm"].shape == (5, 1)
        np.testing.assert_allclose(out["norm"][:, 0], want, rtol=1e-6)
        np.testing.assert_array_equal(out["is_anomaly"][:, 0], want < scorer.threshold)
    # Encoded images: decoded and resized exactly as /v1/score and Scorer.score do.
    imgs = random_images(4, seed=9, size=40)
    blobs = [png_bytes(imgs[0]), _jpeg(imgs[1]), png_bytes(imgs[2]), _jpeg(imgs[3])]
    want = np.array([r.norm for r in scorer.score(blobs)], np.float32)
    out = infer(c, "http", "digits", "image_bytes", encoded(blobs), outputs=("norm",))
    assert set(out) == {"norm"}
    np.testing.assert_allclose(out["norm"][:, 0], want, rtol=1e-6)
    # The request's threshold decides is_anomaly.
    mid = float(np.median(want))
    out = infer(c, "http", "digits", "image_bytes", encoded(blobs), threshold=mid)
    np.testing.assert_array_equal(out["is_anomaly"][:, 0], want < mid)


def test_grpc_same_answers_and_errors(server: str, scorer: Scorer) -> None:
    from tritonclient.utils import InferenceServerException

    url = f"127.0.0.1:{GRPC_PORT}"
    assert check_server("grpc", url, "digits")["model_ready"]
    c = connect("grpc", url)
    batch = nchw_images(3, seed=8)
    out = infer(c, "grpc", "digits", "images", batch, threshold=1e9)
    np.testing.assert_allclose(out["norm"][:, 0], scorer.score_array(batch), rtol=1e-6)
    assert out["is_anomaly"].all()
    blobs = [png_bytes(im) for im in random_images(2, seed=3, size=20)]
    out = infer(c, "grpc", "digits", "image_bytes", encoded(blobs))
    np.testing.assert_allclose(out["norm"][:, 0], [r.norm for r in scorer.score(blobs)],
                               rtol=1e-6)
    cases = [("other", "images", batch, "StatusCode.NOT_FOUND", "unknown model"),
             ("digits", "images", batch[:, :, :16], "StatusCode.INVALID_ARGUMENT",
              "must have shape"),
             ("digits", "image_bytes", encoded([blobs[0], b"junk"]),
              "StatusCode.INVALID_ARGUMENT", "image_bytes[1]"),
             ("digits", "images", nchw_images(1, 0).repeat(1200, 0),
              "StatusCode.RESOURCE_EXHAUSTED", "")]
    for model, name, data, code, text in cases:
        with pytest.raises(InferenceServerException) as info:
            infer(c, "grpc", model, name, np.ascontiguousarray(data))
        assert info.value.status() == code and text in info.value.message(), info.value
    with urllib.request.urlopen(f"http://{server}/metrics") as r:
        assert 'path="grpc:ModelInfer"' in r.read().decode()


def test_v1_and_v2_images_share_batches(server: str) -> None:
    """A /v2 request's images join the partial batch a /v1 request left waiting."""
    def metric(name: str) -> float:
        with urllib.request.urlopen(f"http://{server}/metrics") as r:
            text = r.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = metric("oecl_batch_size_count"), metric("oecl_batch_size_sum")
    # Nine images, batches of eight: one image is left to wait out the 1 s batching delay.
    buf = io.BytesIO()
    np.save(buf, nchw_images(9, seed=1))
    v1 = urllib.request.Request(f"http://{server}/v1/score", data=buf.getvalue(),
                                headers={"Content-Type": "application/x-npy"})
    out: dict[str, bytes] = {}
    t = threading.Thread(target=lambda: out.setdefault("v1", urllib.request.urlopen(v1).read()))
    t.start()
    deadline = time.monotonic() + 10
    while metric("oecl_queue_depth") < 1:
        assert time.monotonic() < deadline, "the /v1 request never reached the queue"
        time.sleep(0.01)
    res = infer(connect("http", server), "http", "digits", "images", nchw_images(2, seed=4))
    t.join(10)
    assert res["norm"].shape == (2, 1) and len(json.loads(out["v1"])["results"]) == 9
    after = metric("oecl_batch_size_count"), metric("oecl_batch_size_sum")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 11)
    with urllib.request.urlopen(f"http://{server}/metrics") as r:
        assert 'path="/v2/models/{name}/infer"' in r.read().decode()


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def client(scorer: Scorer) -> Iterator[TestClient]:
    cfg = ServerConfig(BatchPolicy(max_delay_ms=1.0, max_queue=8), max_body_mb=0.25)
    with TestClient(create_app(scorer, cfg)) as c:
        yield c


INFER = "/v2/models/oecl/infer"


def _binary(head: dict, data: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    text = json.dumps(head).encode()
    return text + data, {"Inference-Header-Content-Length": str(
        len(text) if header_length is None else header_length)}


def _images_head(shape: list[int], size: int, datatype: str = "UINT8") -> dict:
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": shape,
                        "parameters": {"binary_data_size": size}}]}


def _bytes_tensor(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def test_routes_metadata_and_404s(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/oecl/versions/1").json()
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}
    assert client.get("/v2/models/oecl/ready").status_code == 200
    for path in ("/v2/models/other", "/v2/models/oecl/versions/2", "/v2/models/oecl/versions/2"
                 "/ready", "/v2/models/other/infer", "/v2/nothing"):
        r = client.get(path) if not path.endswith("infer") else client.post(path, content=b"{}")
        assert r.status_code == 404 and "error" in r.json(), path
    assert client.post("/v2/models/oecl/versions/7/infer", content=b"{}").status_code == 404
    r = client.get(INFER)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_json_request_and_output_selection(client: TestClient, scorer: Scorer) -> None:
    batch = nchw_images(2, seed=5)
    body = {"id": "r1", "inputs": [{"name": "images", "datatype": "UINT8",
                                    "shape": list(batch.shape), "data": batch.tolist()}],
            "outputs": [{"name": "is_anomaly"}], "parameters": {"threshold": 1e9}}
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == "r1" and got["model_name"] == "oecl" and got["model_version"] == "1"
    assert got["outputs"] == [{"name": "is_anomaly", "datatype": "BOOL", "shape": [2, 1],
                               "data": [True, True]}]
    body["outputs"] = []  # empty: every output
    body["parameters"] = {"binary_data_output": True}
    r = client.post(INFER, json=body)
    head_len = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:head_len])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [8, 2]
    norms = np.frombuffer(r.content[head_len:head_len + 8], "<f4")
    np.testing.assert_allclose(norms, scorer.score_array(batch), rtol=1e-6)


@pytest.mark.parametrize("case, status, needle", [
    ("datatype", 400, "'images' must be UINT8"),
    ("shape", 400, "'images' must have shape [-1, 3, 32, 32]"),
    ("short", 400, "'images': 3071 bytes"),
    ("header_beyond_body", 400, "beyond"),
    ("sizes_do_not_add_up", 400, "add up"),
    ("size_past_body", 400, "runs past"),
    ("bad_image", 400, "image_bytes[1]"),
    ("bytes_element_truncated", 400, "element 1 runs past"),
    ("unknown_input", 400, "unknown input 'pixels'"),
    ("unknown_output", 400, "unknown output 'embedding'"),
    ("threshold", 400, "threshold must be a finite number"),
    ("too_many", 413, "queues at most 8"),
    ("not_json", 400, "not JSON"),
    ("empty", 400, "holds no images"),
    ("gzip", 400, "Content-Encoding"),
])
def test_bad_requests_name_the_problem(client: TestClient, case: str, status: int,
                                       needle: str) -> None:
    one = nchw_images(1, seed=2).tobytes()
    png = png_bytes(random_images(1)[0])
    headers: dict = {}
    if case == "datatype":
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one), "INT8"), one)
    elif case == "shape":
        body, headers = _binary(_images_head([1, 3, 32, 16], len(one)), one)
    elif case == "short":
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one) - 1), one[:-1])
    elif case == "header_beyond_body":
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one)), one, 10**6)
    elif case == "sizes_do_not_add_up":
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one)), one + b"xx")
    elif case == "size_past_body":
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one) + 5), one)
    elif case in ("bad_image", "bytes_element_truncated"):
        data = _bytes_tensor([png, b"not an image"])
        if case == "bytes_element_truncated":
            data = data[:-3]
        body, headers = _binary({"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                             "shape": [2], "parameters": {
                                                 "binary_data_size": len(data)}}]}, data)
    elif case == "unknown_input":
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1],
                                       "data": [1]}]}).encode()
    elif case in ("unknown_output", "threshold"):
        head = _images_head([1, 3, 32, 32], len(one))
        if case == "unknown_output":
            head["outputs"] = [{"name": "embedding"}]
        else:
            head["parameters"] = {"threshold": "high"}
        body, headers = _binary(head, one)
    elif case == "too_many":
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                       "shape": [9, 3, 32, 32], "data": [0]}]}).encode()
    elif case == "not_json":
        body = b"{nope"
    elif case == "empty":
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                       "shape": [0, 3, 32, 32], "data": []}]}).encode()
    else:
        body, headers = _binary(_images_head([1, 3, 32, 32], len(one)), one)
        headers["Content-Encoding"] = "gzip"
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and needle in r.json()["error"], r.json()


def test_body_limit_applies_to_v2(client: TestClient) -> None:
    big = bytes(300 * 1024)
    body, headers = _binary(_images_head([100, 3, 32, 32], len(big)), big)
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 413 and "byte limit" in r.json()["error"]


def test_workers_each_serve_v2_and_grpc(artifact_dir: Path, tmp_path: Path,
                                        scorer: Scorer) -> None:
    """With --workers 2 every worker opens the gRPC port too (SO_REUSEPORT), so either worker
    answers either protocol."""
    grpc_port = free_port()
    with oecl_serve(artifact_dir, tmp_path / "serve.log", "--workers", "2", "--threads", "1",
                    "--grpc-port", str(grpc_port)) as url:
        worker_pids(f"http://{url}", 2)  # both up, so either may answer and count
        batch = nchw_images(2, seed=6)
        want = scorer.score_array(batch)
        for protocol, address in (("http", url), ("grpc", f"127.0.0.1:{grpc_port}")):
            c = connect(protocol, address)
            for _ in range(4):
                out = infer(c, protocol, "oecl", "images", batch, outputs=("norm",))
                np.testing.assert_allclose(out["norm"][:, 0], want, rtol=1e-6)
        with urllib.request.urlopen(f"http://{url}/metrics") as r:
            text = r.read().decode()
        grpc_ok = [line for line in text.splitlines() if line.startswith("oecl_requests_total{")
                   and 'path="grpc:ModelInfer"' in line and 'code="200"' in line]
        assert [line.rsplit(" ", 1)[1] for line in grpc_ok] == ["4.0"], text
        assert "oecl_workers 2.0" in text
