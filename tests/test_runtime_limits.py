"""Serving under hostile input: bounded work per request, timeouts, every decoder failure a
400 naming the image, and no process-wide side effects of opening a scorer."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images
from PIL import Image
from starlette.testclient import TestClient

from oecl_runtime import Backend, ImageError, Scorer
from oecl_runtime.batcher import DynamicBatcher
from oecl_runtime.inputs import Abandoned, to_batch
from oecl_runtime.preprocess import InputSpec, UnsupportedFormat, load
from oecl_runtime.server import ServerConfig, create_app

NPY = {"content-type": "application/x-npy"}


@pytest.fixture(scope="module")
def client(scorer: Scorer) -> Iterator[TestClient]:
    cfg = ServerConfig(max_queue=64, max_body_mb=4, max_image_pixels=1000 * 1000,
                       max_request_pixels=2_500_000)
    with TestClient(create_app(scorer, cfg)) as c:
        yield c


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- counted first


def test_npy_is_counted_from_its_header_before_decoding(client: TestClient) -> None:
    # Two million 1x1 images in a 2 MB body: each would be resized to 32x32 (tens of seconds
    # and a gigabyte) before the old server counted them.
    t0 = time.perf_counter()
    r = client.post("/v1/score", content=_npy(np.zeros((2_000_000, 1, 1, 1), np.uint8)),
                    headers=NPY)
    assert r.status_code == 413 and "2000000 images" in r.json()["error"]
    assert time.perf_counter() - t0 < 2.0


def test_npy_header_must_match_its_data(client: TestClient) -> None:
    body = _npy(np.zeros((2, 32, 32, 3), np.uint8))
    r = client.post("/v1/score", content=body[:-100], headers=NPY)
    assert r.status_code == 400 and "header says" in r.json()["error"]
    forged = body.replace(b"(2, 32, 32, 3)", b"(9, 32, 32, 3)")
    assert client.post("/v1/score", content=forged, headers=NPY).status_code == 400
    r = client.post("/v1/score", content=_npy(np.zeros((0, 0), np.uint8)), headers=NPY)
    assert r.status_code == 400 and "no pixels" in r.json()["error"]


def test_multipart_parts_are_counted_before_parsing(client: TestClient) -> None:
    png = png_bytes(random_images(1)[0])
    files = [("f", (f"{i}.png", png, "image/png")) for i in range(65)]  # queue holds 64
    r = client.post("/v1/score", files=files)
    assert r.status_code == 413 and "65 parts" in r.json()["error"]


def test_multipart_decoded_pixels_are_capped_per_request(client: TestClient) -> None:
    big = _encoded(np.zeros((900, 900), np.uint8), "PNG")  # 0.81 M pixels, under the image cap
    files = [("f", (f"{i}.png", big, "image/png")) for i in range(4)]  # 3.2 M > 2.5 M per request
    r = client.post("/v1/score", files=files)
    assert r.status_code == 413 and "decoded pixels" in r.json()["error"]
    assert client.post("/v1/score", files=files[:3]).status_code == 200


def test_decoded_pixels_are_capped_from_the_header() -> None:
    # A 12000 x 12000 PNG compresses to a few hundred KB; decoding it took 2.5 s and 690 MB.
    bomb = _encoded(np.zeros((12000, 12000), np.uint8), "PNG")
    spec = InputSpec(32, 32, 3, resize=32)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="over the limit of"):
        load(bomb, spec, max_pixels=4096 * 4096)
    assert time.perf_counter() - t0 < 0.5
    strip = np.zeros((1, 20000), np.uint8)  # within the cap, but resizes to 32 x 640000
    with pytest.raises(ImageError, match="aspect ratio"):
        load(_encoded(strip, "PNG"), spec, max_pixels=1_000_000)


def test_jpeg_is_drafted_to_the_size_it_needs() -> None:
    rng = np.random.default_rng(0)
    jpeg = _encoded(rng.integers(0, 256, (2000, 2400, 3), dtype=np.uint8), "JPEG")
    spec = InputSpec(32, 32, 3, resize=32)
    from oecl_runtime.preprocess import decode

    img = decode(jpeg, spec=spec)
    assert img.size == (300, 250)  # 1/8 scale in the DCT, still above the 32-pixel side
    assert load(jpeg, spec).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- formats

ACCEPTED = "PNG, JPEG, BMP, GIF"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros, compressed row by row (never held whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    z, row, idat = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        idat.append(z.compress(row))
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat))
            + chunk(b"IEND", b""))


def _ico_holding(png: bytes) -> bytes:
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _refused_bodies() -> dict[str, bytes]:
    """One small image of each refused format, as Pillow writes it (where it can)."""
    img = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = {"ICO": _ico_holding(_encoded(img, "PNG"))}
    for fmt, name in (("EPS", "EPS"), ("TIFF", "TIFF"), ("JPEG2000", "JPEG 2000"),
                      ("WEBP", "WebP"), ("AVIF", "AVIF"), ("QOI", "QOI"), ("IM", "IM"),
                      ("PPM", "Netpbm"), ("DDS", "DDS"), ("SGI", "SGI")):
        try:
            out[name] = _encoded(img, fmt)
        except (KeyError, OSError):  # a Pillow built without that codec
            continue
    return out


def test_only_the_accepted_formats_are_decoded(client: TestClient, tmp_path: Path) -> None:
    spec = InputSpec(32, 32, 3, resize=32)
    refused = _refused_bodies()
    assert {"ICO", "EPS", "TIFF", "IM", "QOI"} <= set(refused)
    for name, body in refused.items():
        r = client.post("/v1/score", content=body, headers={"content-type": "image/x"})
        assert r.status_code == 415, (name, r.text)
        error = r.json()["error"]
        assert f"{name} images are not accepted" in error and ACCEPTED in error, error
        # The same check for files (`oecl score`, the library), whatever the file is called.
        path = tmp_path / "x.png"
        path.write_bytes(body)
        with pytest.raises(UnsupportedFormat, match=f"x.png: {name} images are not accepted"):
            load(path, spec)
    for fmt in ("PNG", "JPEG", "BMP", "GIF"):
        body = _encoded(np.full((40, 48, 3), 99, np.uint8), fmt)
        assert client.post("/v1/score", content=body).status_code == 200, fmt
    r = client.post("/v1/score", content=b"\x00" * 64)  # unknown bytes
    assert r.status_code == 415 and "not a recognised image format" in r.json()["error"]


def test_an_ico_bomb_is_refused_before_pillow_opens_it(client: TestClient) -> None:
    # A 140 KB ICO holding a 12000 x 12000 PNG: Pillow's ICO plugin decodes the whole PNG in
    # `open()`, before any pixel cap is checked (seconds on the event loop, hundreds of MB).
    bomb = _ico_holding(_png_claiming(12000, 12000))
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    r = client.post("/v1/score", content=bomb)
    assert r.status_code == 415 and "ICO" in r.json()["error"]
    assert time.perf_counter() - t0 < 0.5
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedFormat, match="ICO"):
        load(bomb, InputSpec(32, 32, 3, resize=32))
    assert time.perf_counter() - t0 < 0.5


def test_only_bounded_decodes_run_on_the_event_loop(scorer: Scorer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Small, plain images decode on the event loop; anything whose decode cost a small body
    does not bound goes to the thread pool."""
    from PIL import PngImagePlugin

    import oecl_runtime.server as server_mod

    real, hops = server_mod.run_in_threadpool, []

    async def counting(fn, *args, **kw):
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(server_mod, "run_in_threadpool", counting)
    img = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 100_000, zip=True)  # inflated by `open` itself
    padded = PngImagePlugin.PngInfo()
    padded.add_text("comment", "".join(map(chr, np.random.default_rng(3).integers(
        65, 90, 70_000))))
    cases = {"plain": (_encoded(img, "PNG"), 0),
             "zTXt": (_encoded(img, "PNG", pnginfo=text), 1),
             "progressive": (_encoded(img, "JPEG", progressive=True), 1),
             "baseline": (_encoded(img, "JPEG"), 0),
             "over 64 KB": (_encoded(img, "PNG", pnginfo=padded), 1)}
    with TestClient(create_app(scorer)) as c:
        for name, (body, want) in cases.items():
            hops.clear()
            assert c.post("/v1/score", content=body).status_code == 200, name
            assert len(hops) == want, name


# ----------------------------------------------------------------------------- messages


def test_npy_shape_and_content_type_errors_say_what_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/score", content=_npy(np.zeros((4, 28, 28), np.uint8)), headers=NPY)
    error = r.json()["error"]
    assert r.status_code == 400 and "got shape (4, 28, 28)" in error
    assert "CHW (3, 32, 32)" in error and "NCHW (N, 3, 32, 32)" in error and "HWC" in error
    # An .npy body sent without its Content-Type.
    r = client.post("/v1/score", content=_npy(np.zeros((32, 32, 3), np.uint8)))
    assert r.status_code == 415
    assert "Content-Type is none" in r.json()["error"] and "application/x-npy" in r.json()["error"]
    r = client.post("/v1/score", content=b"GIF89a-not-really",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 400  # claims GIF: a broken GIF, not an unknown format
    r = client.post("/v1/score", content=b"hello", headers={"content-type": "text/plain"})
    error = r.json()["error"]
    assert r.status_code == 415 and "received Content-Type: text/plain" in error
    assert "application/x-npy" in error and "multipart/form-data" in error and ACCEPTED in error


# ----------------------------------------------------------------------------- non-finite


class _NaNForBlack(Backend):
    """The real model, except that an all-black image scores NaN (a broken model's output)."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.precision = inner, "nan-for-black", inner.precision
        self.max_batch = inner.max_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        norms = np.array(self.inner.run(batch), np.float32)
        norms[batch.reshape(len(batch), -1).max(axis=1) == 0] = np.nan
        return norms


def _strict_json(text: str) -> dict:
    def refuse(const: str) -> None:
        raise AssertionError(f"invalid JSON constant {const}")

    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_score_is_an_error_never_normal(scorer: Scorer) -> None:
    app = create_app(Scorer(scorer.artifact, _NaNForBlack(scorer.backend)))
    black = _encoded(np.zeros((32, 32, 3), np.uint8), "PNG")
    fine = _encoded(np.full((32, 32, 3), 120, np.uint8), "PNG")
    with TestClient(app) as c:
        r = c.post("/v1/score", content=black)
        body = _strict_json(r.text)
        assert r.status_code == 500 and "non-finite norm (nan)" in body["error"]
        assert all("is_anomaly" not in x for x in body["results"])
        r = c.post("/v1/score", files=[("a", ("black.png", black, "image/png")),
                                       ("b", ("fine.png", fine, "image/png"))])
        assert r.status_code == 200
        dark, good = _strict_json(r.text)["results"]
        assert dark["name"] == "black.png" and "non-finite" in dark["error"]
        assert "is_anomaly" not in dark and good["norm"] > 0
        r = c.post("/v1/score", content=_npy(np.zeros((2, 3, 32, 32), np.uint8)), headers=NPY)
        assert r.status_code == 500 and len(_strict_json(r.text)["results"]) == 2
        assert c.post("/v1/score", content=fine).status_code == 200
        assert 'oecl_errors_total{reason="non_finite"} 3.0' in c.get("/metrics").text


def test_a_non_finite_score_fails_a_v2_request(scorer: Scorer) -> None:
    app = create_app(Scorer(scorer.artifact, _NaNForBlack(scorer.backend)))
    name = scorer.artifact.input_name

    def infer(images: np.ndarray, **parameters: float) -> object:
        req = {"inputs": [{"name": name, "shape": list(images.shape), "datatype": "UINT8",
                           "data": images.ravel().tolist()}], "parameters": parameters}
        return c.post("/v2/models/oecl/infer", json=req)

    with TestClient(app) as c:
        r = infer(np.zeros((2, 3, 32, 32), np.uint8))
        assert r.status_code == 500 and "non-finite norm (nan)" in _strict_json(r.text)["error"]
        assert infer(np.full((1, 3, 32, 32), 120, np.uint8)).status_code == 200
        r = infer(np.full((1, 3, 32, 32), 120, np.uint8), threshold=-1.0)
        assert r.status_code == 400 and "finite number >= 0" in r.json()["error"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "1e999"])
def test_a_threshold_query_must_be_finite_and_not_negative(client: TestClient,
                                                           value: str) -> None:
    body = _encoded(np.full((32, 32, 3), 120, np.uint8), "PNG")
    r = client.post(f"/v1/score?threshold={value}", content=body)
    assert r.status_code == 400 and "finite number >= 0" in r.json()["error"]


# ----------------------------------------------------------------------------- decoder errors


def test_sixteen_bit_images_keep_their_range() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    png = _encoded(ramp, "PNG")
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    got = load(png, InputSpec(32, 32, 1, resize=64))  # no resampling: the centre 32 x 32
    want = (ramp[16:48, 16:48] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(got[0], want)
    assert (got == 255).mean() < 0.05  # clipping made 98.8% of such pixels white
    with pytest.raises(ImageError, match="floating-point"):  # e.g. a float TIFF opened by hand
        load(Image.fromarray(np.ones((40, 40), np.float32)), InputSpec(32, 32, 1))


def test_conversion_failures_are_image_errors() -> None:
    # Pillow has no LAB -> L conversion: a ValueError that used to escape `load`.
    with pytest.raises(ImageError, match="lab.tif"):
        load(Image.new("LAB", (40, 40)), InputSpec(32, 32, 1), name="lab.tif")


def test_scorer_score_names_an_empty_array(scorer: Scorer) -> None:
    with pytest.raises(ImageError, match="no pixels"):  # was ZeroDivisionError
        scorer.score(np.zeros((0, 0), np.uint8))


def _mutations(data: bytes, count: int, rng: random.Random) -> Iterator[bytes]:
    for _ in range(count):
        d = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randrange(len(d))
            if op < 0.6:
                d[i] = rng.randrange(256)
            elif op < 0.8:
                del d[i:i + rng.randint(1, 16)]
            else:
                d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        yield bytes(d)


def test_fuzzed_images_only_ever_get_200_or_4xx(scorer: Scorer) -> None:
    """Mutated bodies of the accepted formats (progressive JPEG, interlaced PNG too), of the
    refused ones (an ICO holding a PNG, EPS, TIFF, JPEG 2000, QOI, IM, ...) and of npy, alone
    and as a multipart part beside a good one: never a 500, never a hang (bounded: 60 per
    format and a time limit)."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    seeds = {fmt: _encoded(img, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP")}
    seeds["progressive JPEG"] = _encoded(img, "JPEG", progressive=True)
    seeds["interlaced PNG"] = _encoded(img, "PNG", interlace=True)
    seeds.update(_refused_bodies())
    seeds["npy"] = _npy(img)
    good = ("good", ("good.png", _encoded(img, "PNG"), "image/png"))
    cfg = ServerConfig(max_image_pixels=2048 * 2048)
    r = random.Random(7)
    deadline = time.monotonic() + 120
    statuses: dict[int, int] = {}
    with TestClient(create_app(scorer, cfg)) as c:
        for fmt, data in seeds.items():
            headers = NPY if fmt == "npy" else {"content-type": "application/octet-stream"}
            for i, body in enumerate(_mutations(data, 60, r)):
                if time.monotonic() > deadline:
                    break
                if i % 4 == 3 and fmt != "npy":  # one part of several: only its own row fails
                    res = c.post("/v1/score", files=[("x", ("x.bin", body, "image/png")), good])
                    assert res.status_code == 200, (fmt, res.text)
                    assert res.json()["results"][1]["norm"] > 0
                    continue
                res = c.post("/v1/score", content=body, headers=headers)
                statuses[res.status_code] = statuses.get(res.status_code, 0) + 1
                assert res.status_code == 200 or 400 <= res.status_code < 500, (
                    fmt, res.status_code, res.text)
                assert "error" in res.json() or "results" in res.json()
        m = c.get("/metrics").text
    assert 'reason="inference"' not in m
    assert statuses.get(400, 0) > 0 and statuses.get(415, 0) > 0  # mutations broke images


def test_oecl_score_writes_error_rows(artifact_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(random_images(1)[0]))
    (tmp_path / "huge.png").write_bytes(_encoded(np.zeros((12000, 12000), np.uint8), "PNG"))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "eps.png").write_bytes(_refused_bodies()["EPS"])
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "oecl_runtime", "score", str(good), str(tmp_path / "huge.png"),
         str(tmp_path / "cut.png"), str(tmp_path / "eps.png"), "--model", str(artifact_dir),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["good.png"]["error"] is None and rows["good.png"]["norm"] > 0
    assert "over the limit" in rows["huge.png"]["error"]
    assert "cut.png" in rows["cut.png"]["error"] or "decode" in rows["cut.png"]["error"]
    assert f"EPS images are not accepted (accepted formats: {ACCEPTED})" in rows["eps.png"]["error"]


# ----------------------------------------------------------------------------- no side effects


def test_opening_a_scorer_keeps_subnormal_floats(artifact_dir: Path) -> None:
    code = ("from oecl_runtime import Scorer\n"
            f"s = Scorer.open({str(artifact_dir)!r}, backend='onnxruntime-cpu')\n"
            "import numpy as np; s.score_array(np.zeros((1, 3, 32, 32), np.uint8))\n"
            "assert float('1e-320') != 0.0, 'subnormals flushed process-wide'\n"
            "assert np.float64(5e-324) * 2 != 0.0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]


# ----------------------------------------------------------------------------- batching


def test_a_lone_request_does_not_wait_for_the_batch_delay() -> None:
    runs: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        runs.append(len(batch))
        return np.ones(len(batch), np.float32)

    b = DynamicBatcher(run, (1, 2, 2), max_batch=8, max_delay_s=2.0, max_queue=64)
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


@pytest.fixture(scope="module")
def live(scorer: Scorer) -> Iterator[tuple[int, object]]:
    import uvicorn

    from oecl_runtime.server import _uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(header_timeout_s=0.5, body_timeout_s=0.5, max_queue=256)
    app = create_app(scorer, cfg)
    server = uvicorn.Server(_uvicorn_config(app, "127.0.0.1", port, cfg, "warning", 5, False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield port, app
    server.should_exit = True
    thread.join(15)


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
    import oecl_runtime.server as server_mod

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
    body = _npy(np.zeros((40, 64, 64, 3), np.uint8))  # NHWC: needs decoding
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    metrics = app.metrics  # type: ignore[attr-defined]
    while 'reason="client_gone"' not in metrics.render().decode():
        assert time.monotonic() < deadline, "decoding went on for a client that had gone"
        time.sleep(0.05)
    assert len(ran) < 500


# ----------------------------------------------------------------------------- --workers


def test_serving_threads_share_the_cores_among_workers() -> None:
    from oecl_runtime.server import serving_threads

    assert serving_threads(1, cores=2) == 2 and serving_threads(2, cores=2) == 1
    assert serving_threads(1, cores=16) == 16 and serving_threads(4, cores=16) == 4
    assert serving_threads(3, cores=2) == 1


def test_workers_share_one_port_and_metrics_count_all_of_them(artifact_dir: Path) -> None:
    import json
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
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < 2:  # both workers up (each answers with its own pid)
            assert time.monotonic() < deadline, "workers did not come up"
            try:
                with urllib.request.urlopen(url + "/v1/model", timeout=2) as r:
                    pids.add(json.loads(r.read())["runtime"]["pid"])
            except OSError:
                time.sleep(0.2)
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
    body = _npy(np.zeros((256, 3, 32, 32), np.uint8))  # model form: straight to the queue
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(1.5)  # 8 batches of 32 would take 0.8 s
    assert 0 < sum(ran) < 256, ran
    assert batcher.depth == 0


def test_bodies_still_arriving_are_bounded_in_bytes(scorer: Scorer) -> None:
    import uvicorn

    from oecl_runtime.server import _uvicorn_config

    # 64 requests x 1 MB / 8: 8 MB of bodies may be arriving at once.
    cfg = ServerConfig(max_queue=16, max_body_mb=1, body_timeout_s=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(scorer, cfg)
    server = uvicorn.Server(_uvicorn_config(app, "127.0.0.1", port, cfg, "warning", 5, False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
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
        server.should_exit = True
        thread.join(15)


def test_score_requests_past_their_body_are_limited(scorer: Scorer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests being decoded (or queued) count against `max_requests`; one more gets 503."""
    import oecl_runtime.server as server_mod

    release = asyncio.Event()

    async def held(fn, *args, **kw):  # every off-loop decode waits for the test
        await release.wait()
        return fn(*args, **kw)

    monkeypatch.setattr(server_mod, "run_in_threadpool", held)
    app = create_app(scorer, ServerConfig(max_queue=16))
    limit = 64  # max_requests: max(64, 2 x max_queue)
    big = _encoded(np.random.default_rng(9).integers(0, 256, (200, 200, 3), np.uint8), "PNG")
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
