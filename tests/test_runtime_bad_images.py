"""Images a decoder cannot read and scores that are not numbers: every decoder failure a 400
naming the image (an error row in `oecl score`), a non-finite norm an error and never a
decision, fuzzed bodies never a 500, and no process-wide side effects of opening a scorer."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes, random_images
from image_bodies import ACCEPTED, NPY, encoded, npy, refused_bodies
from PIL import Image
from starlette.testclient import TestClient

from oecl_runtime import Backend, ImageError, Scorer
from oecl_runtime.preprocess import InputSpec, load
from oecl_runtime.serving.app import create_app
from oecl_runtime.serving.config import ServerConfig

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
    black = encoded(np.zeros((32, 32, 3), np.uint8), "PNG")
    fine = encoded(np.full((32, 32, 3), 120, np.uint8), "PNG")
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
        r = c.post("/v1/score", content=npy(np.zeros((2, 3, 32, 32), np.uint8)), headers=NPY)
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


# ----------------------------------------------------------------------------- decoder errors


def test_sixteen_bit_images_keep_their_range() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    png = encoded(ramp, "PNG")
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
    seeds = {fmt: encoded(img, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP")}
    seeds["progressive JPEG"] = encoded(img, "JPEG", progressive=True)
    seeds["interlaced PNG"] = encoded(img, "PNG", interlace=True)
    seeds.update(refused_bodies())
    seeds["npy"] = npy(img)
    good = ("good", ("good.png", encoded(img, "PNG"), "image/png"))
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
    (tmp_path / "huge.png").write_bytes(encoded(np.zeros((12000, 12000), np.uint8), "PNG"))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "eps.png").write_bytes(refused_bodies()["EPS"])
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
