"""Bounded work per request: images counted from headers before anything is decoded, decoded
pixels capped per image and per request, formats outside the accepted list refused, small
images alone decoded on the event loop, and refusals that say what is accepted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images
from image_bodies import ACCEPTED, NPY, encoded, ico_holding, npy, png_claiming, refused_bodies
from starlette.testclient import TestClient

from oecl_runtime import ImageError, Scorer
from oecl_runtime.preprocess import InputSpec, UnsupportedFormat, load
from oecl_runtime.serving.app import create_app
from oecl_runtime.serving.config import BatchPolicy, ServerConfig


@pytest.fixture(scope="module")
def client(scorer: Scorer) -> Iterator[TestClient]:
    cfg = ServerConfig(BatchPolicy(max_queue=64), max_body_mb=4, max_image_pixels=1000 * 1000,
                       max_request_pixels=2_500_000)
    with TestClient(create_app(scorer, cfg)) as c:
        yield c


# ----------------------------------------------------------------------------- counted first


def test_npy_is_counted_from_its_header_before_decoding(client: TestClient) -> None:
    # Two million 1x1 images in a 2 MB body: each would be resized to 32x32 (tens of seconds
    # and a gigabyte) before the old server counted them.
    t0 = time.perf_counter()
    r = client.post("/v1/score", content=npy(np.zeros((2_000_000, 1, 1, 1), np.uint8)),
                    headers=NPY)
    assert r.status_code == 413 and "2000000 images" in r.json()["error"]
    assert time.perf_counter() - t0 < 2.0


def test_npy_header_must_match_its_data(client: TestClient) -> None:
    body = npy(np.zeros((2, 32, 32, 3), np.uint8))
    r = client.post("/v1/score", content=body[:-100], headers=NPY)
    assert r.status_code == 400 and "header says" in r.json()["error"]
    forged = body.replace(b"(2, 32, 32, 3)", b"(9, 32, 32, 3)")
    assert client.post("/v1/score", content=forged, headers=NPY).status_code == 400
    r = client.post("/v1/score", content=npy(np.zeros((0, 0), np.uint8)), headers=NPY)
    assert r.status_code == 400 and "no pixels" in r.json()["error"]


def test_multipart_parts_are_counted_before_parsing(client: TestClient) -> None:
    png = png_bytes(random_images(1)[0])
    files = [("f", (f"{i}.png", png, "image/png")) for i in range(65)]  # queue holds 64
    r = client.post("/v1/score", files=files)
    assert r.status_code == 413 and "65 parts" in r.json()["error"]


def test_multipart_decoded_pixels_are_capped_per_request(client: TestClient) -> None:
    big = encoded(np.zeros((900, 900), np.uint8), "PNG")  # 0.81 M pixels, under the image cap
    files = [("f", (f"{i}.png", big, "image/png")) for i in range(4)]  # 3.2 M > 2.5 M per request
    r = client.post("/v1/score", files=files)
    assert r.status_code == 413 and "decoded pixels" in r.json()["error"]
    assert client.post("/v1/score", files=files[:3]).status_code == 200


def test_decoded_pixels_are_capped_from_the_header() -> None:
    # A 12000 x 12000 PNG compresses to a few hundred KB; decoding it took 2.5 s and 690 MB.
    bomb = encoded(np.zeros((12000, 12000), np.uint8), "PNG")
    spec = InputSpec(32, 32, 3, resize=32)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="over the limit of"):
        load(bomb, spec, max_pixels=4096 * 4096)
    assert time.perf_counter() - t0 < 0.5
    strip = np.zeros((1, 20000), np.uint8)  # within the cap, but resizes to 32 x 640000
    with pytest.raises(ImageError, match="aspect ratio"):
        load(encoded(strip, "PNG"), spec, max_pixels=1_000_000)


def test_jpeg_is_drafted_to_the_size_it_needs() -> None:
    rng = np.random.default_rng(0)
    jpeg = encoded(rng.integers(0, 256, (2000, 2400, 3), dtype=np.uint8), "JPEG")
    spec = InputSpec(32, 32, 3, resize=32)
    from oecl_runtime.preprocess import decode

    img = decode(jpeg, spec=spec)
    assert img.size == (300, 250)  # 1/8 scale in the DCT, still above the 32-pixel side
    assert load(jpeg, spec).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- formats


def test_only_the_accepted_formats_are_decoded(client: TestClient, tmp_path: Path) -> None:
    spec = InputSpec(32, 32, 3, resize=32)
    refused = refused_bodies()
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
        body = encoded(np.full((40, 48, 3), 99, np.uint8), fmt)
        assert client.post("/v1/score", content=body).status_code == 200, fmt
    r = client.post("/v1/score", content=b"\x00" * 64)  # unknown bytes
    assert r.status_code == 415 and "not a recognised image format" in r.json()["error"]


def test_an_ico_bomb_is_refused_before_pillow_opens_it(client: TestClient) -> None:
    # A 140 KB ICO holding a 12000 x 12000 PNG: Pillow's ICO plugin decodes the whole PNG in
    # `open()`, before any pixel cap is checked (seconds on the event loop, hundreds of MB).
    bomb = ico_holding(png_claiming(12000, 12000))
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

    import oecl_runtime.serving.v1 as server_mod

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
    cases = {"plain": (encoded(img, "PNG"), 0),
             "zTXt": (encoded(img, "PNG", pnginfo=text), 1),
             "progressive": (encoded(img, "JPEG", progressive=True), 1),
             "baseline": (encoded(img, "JPEG"), 0),
             "over 64 KB": (encoded(img, "PNG", pnginfo=padded), 1)}
    with TestClient(create_app(scorer)) as c:
        for name, (body, want) in cases.items():
            hops.clear()
            assert c.post("/v1/score", content=body).status_code == 200, name
            assert len(hops) == want, name


# ----------------------------------------------------------------------------- messages


def test_npy_shape_and_content_type_errors_say_what_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/score", content=npy(np.zeros((4, 28, 28), np.uint8)), headers=NPY)
    error = r.json()["error"]
    assert r.status_code == 400 and "got shape (4, 28, 28)" in error
    assert "CHW (3, 32, 32)" in error and "NCHW (N, 3, 32, 32)" in error and "HWC" in error
    # An .npy body sent without its Content-Type.
    r = client.post("/v1/score", content=npy(np.zeros((32, 32, 3), np.uint8)))
    assert r.status_code == 415
    assert "Content-Type is none" in r.json()["error"] and "application/x-npy" in r.json()["error"]
    r = client.post("/v1/score", content=b"GIF89a-not-really",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 400  # claims GIF: a broken GIF, not an unknown format
    r = client.post("/v1/score", content=b"hello", headers={"content-type": "text/plain"})
    error = r.json()["error"]
    assert r.status_code == 415 and "received Content-Type: text/plain" in error
    assert "application/x-npy" in error and "multipart/form-data" in error and ACCEPTED in error


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "1e999"])
def test_a_threshold_query_must_be_finite_and_not_negative(client: TestClient,
                                                           value: str) -> None:
    body = encoded(np.full((32, 32, 3), 120, np.uint8), "PNG")
    r = client.post(f"/v1/score?threshold={value}", content=body)
    assert r.status_code == 400 and "finite number >= 0" in r.json()["error"]
