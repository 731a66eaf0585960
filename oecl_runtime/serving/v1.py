"""`POST /v1/score`: an image body, an `.npy` array or multipart files in, a norm per image out.

A plain ASGI handler rather than a starlette route: at thousands of one-image requests a
second, routing, `Request` objects, thread-pool hops and per-request future hand-offs cost
several times the PNG decode, and throttled a fast backend. The handler decodes small images
on the event loop (cheaper than a thread hop) when their cost is bounded by a small constant (a
small body, few pixels, no compressed metadata, no progressive scans: `common`), everything
else in the thread pool with a bounded number at once, and hands uint8 arrays to the app's
batcher, whose inference thread wakes the loop once per batch.

Images are counted before they are decoded, from an `.npy` header or the multipart
boundaries (413 over the queue); at most `max_requests` score requests are past their body at
once (503 beyond). A model output that is not a finite number is an error for its image (500
for a request of one), never a score.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from ..batcher import TooManyImages
from ..inputs import npy_array, to_batch
from ..preprocess import ACCEPTED_FORMATS, UnsupportedFormat, load, load_opened, open_image
from ..scorer import check_threshold, non_finite
from .common import HTTPError, inline_body, inline_decode

if TYPE_CHECKING:
    from .app import ScoringApp

NPY_TYPE = "application/x-npy"
SCORE_PATH = "/v1/score"
_BODY_KINDS = (f"{'/'.join(ACCEPTED_FORMATS)} image bytes (any Content-Type), an .npy array as "
               f"{NPY_TYPE}, or images as multipart/form-data files")
_Answer = tuple[int, dict[str, Any], dict[str, str] | None]


def _json_headers(body: bytes, extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if extra:
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    return headers


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": _json_headers(body, headers)})
    await send({"type": "http.response.body", "body": body})


def _threshold(query: bytes, default: float) -> float:
    if b"threshold" not in query:
        return default
    values = parse_qs(query.decode("latin-1")).get("threshold")
    if not values:
        return default
    raw = values[-1]
    try:
        t = float(raw)
    except ValueError:
        raise HTTPError(400, f"threshold must be a number, got {raw!r}", "bad_request") from None
    try:
        return check_threshold(t)
    except ValueError as e:
        raise HTTPError(400, str(e), "bad_request") from None


def _result(x: float, threshold: float) -> dict[str, Any]:
    if math.isfinite(x):
        return {"norm": x, "is_anomaly": x < threshold}
    return {"error": non_finite(x)}


class V1Score:
    """ASGI handler of `/v1/score` for a `ScoringApp` (which owns batcher, limits and metrics)."""

    def __init__(self, app: ScoringApp) -> None:
        self.app = app
        self.cfg, self.spec, self.chw = app.cfg, app.spec, app.chw
        self._in_flight = 0  # score requests past their body: decoding, queued or running

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        if scope["method"] != "POST":
            status, payload, headers = 405, {"error": "method not allowed; use POST"}, {
                "Allow": "POST"}
        else:
            status, payload, headers = await self._score(scope, receive)
        await _send_json(send, status, payload, headers)
        self.app.metrics.request(SCORE_PATH, status)
        if status == 200:
            self.app.metrics.latency.observe(time.perf_counter() - t0)

    async def _score(self, scope: Scope, receive: Receive) -> _Answer:
        app = self.app
        try:
            threshold = _threshold(scope["query_string"], app.scorer.threshold)
            ctype, length = "", None
            for k, v in scope["headers"]:
                if k == b"content-type":
                    ctype = v.decode("latin-1")
                elif k == b"content-length":
                    length = v
            body = await app._read_body(receive, length)
            # Counted from here, where the work starts: a slow upload holds a connection (the
            # connection cap) and its bytes so far (`max_buffered_bytes`), not a request slot.
            if self._in_flight >= self.cfg.max_requests:
                raise app._busy(f"{self.cfg.max_requests} score requests")
            self._in_flight += 1
            try:
                kind = ctype.split(";")[0].strip().lower()
                if kind == "multipart/form-data":
                    return await self._score_multipart(body, ctype, receive, threshold)
                if not body:
                    raise HTTPError(400, "empty body: send an image, multipart files or an .npy",
                                    "bad_request")
                if kind == NPY_TYPE:
                    batch = await self._npy_batch(body, receive)
                else:
                    batch = (await self._decode_one(body, ctype))[None]
                norms = await app._infer(batch, receive)
            finally:
                self._in_flight -= 1
        except Exception as e:
            return app._failure(e)
        values = norms.tolist()
        return self._answer(threshold, [_result(x, threshold) for x in values], values)

    def _answer(self, threshold: float, results: list[dict[str, Any]], values: list[float]
                ) -> _Answer:
        """200 with per-image results, where a non-finite score is its image's error; 500 when
        that leaves no image of the request scored (for one image: its only answer)."""
        if not all(map(math.isfinite, values)):
            self.app.metrics.error("non_finite")
            if not any("norm" in r for r in results):
                first = next(x for x in values if not math.isfinite(x))
                return 500, {"error": non_finite(first), "results": results}, None
        return 200, self._payload(threshold, results), None

    def _payload(self, threshold: float, results: list[dict[str, Any]]) -> dict[str, Any]:
        # `score` names what each `norm` holds: the plain norm or the K-view mean-view-norm.
        return {"score": self.app.scorer.artifact.score_name, "direction": "higher_is_normal",
                "threshold": threshold, "results": results}

    async def _decode_one(self, data: bytes, ctype: str) -> np.ndarray:
        cap = self.cfg.max_image_pixels
        try:
            if inline_body(data):
                img = open_image(data, "image bytes", cap)
                if inline_decode(img):
                    return load_opened(img, self.spec, "image bytes", cap)
                async with self.app._decodes:
                    return await run_in_threadpool(load_opened, img, self.spec, "image bytes", cap)
            async with self.app._decodes:
                return await run_in_threadpool(load, data, self.spec, "image bytes", cap)
        except UnsupportedFormat as e:
            got = ctype or "none"
            if data.startswith(b"\x93NUMPY"):
                raise UnsupportedFormat(f"the body is an .npy array but its Content-Type is "
                                        f"{got}: send it as Content-Type: {NPY_TYPE}") from None
            raise UnsupportedFormat(f"{e}; received Content-Type: {got}. Send {_BODY_KINDS}"
                                    ) from None

    async def _npy_batch(self, body: bytes, receive: Receive) -> np.ndarray:
        arr = npy_array(body, self.spec, self.cfg.max_queue, self.cfg.max_image_pixels)
        if arr.ndim == 4 and arr.shape[1:] == self.chw:
            return arr  # already model input: no decode, no copy
        if arr.ndim == 3 and arr.shape == self.chw:
            return arr[None]
        return await self.app._off_loop(receive, to_batch, arr, self.spec,
                                        self.cfg.max_image_pixels)

    async def _score_multipart(self, body: bytes, ctype: str, receive: Receive,
                               threshold: float) -> _Answer:
        app = self.app
        files = await self._multipart_files(body, ctype)
        names = [name for name, _ in files]
        # Headers are read off the event loop too: the parts may hold megabytes.
        batch, errors = await app._off_loop(receive, app._open_and_load, files)
        if errors.count(None) == 0:
            app.metrics.error("bad_image")
            return 400, {"error": f"no part could be read; first: {errors[0]}",
                         "results": [{"name": n, "error": e} for n, e in zip(names, errors,
                                                                             strict=True)]}, None
        if any(errors):
            app.metrics.error("bad_image")
        values = (await app._infer(batch, receive)).tolist()
        norms = iter(values)
        results = [{"name": name, **(_result(next(norms), threshold) if err is None
                                     else {"error": err})}
                   for name, err in zip(names, errors, strict=True)]
        return self._answer(threshold, results, values)

    async def _multipart_files(self, body: bytes, ctype: str) -> list[tuple[str, bytes]]:
        # Count parts by their boundary lines before parsing: a body of ten thousand tiny
        # parts is refused without building ten thousand upload objects.
        boundary = ctype.partition("boundary=")[2].split(";")[0].strip().strip('"')
        if not boundary:
            raise HTTPError(400, "malformed multipart body: no boundary", "bad_request")
        parts = max(0, body.count(b"--" + boundary.encode("latin-1")) - 1)
        if parts > self.cfg.max_queue:
            raise TooManyImages(f"request has {parts} parts, the server queues at most "
                                f"{self.cfg.max_queue} images")
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": SCORE_PATH, "query_string": b"",
                 "headers": [(b"content-type", ctype.encode("latin-1"))]}
        limit = self.cfg.max_body_bytes
        try:
            async with Request(scope, replay).form(max_part_size=limit,
                                                   max_files=self.cfg.max_queue) as form:
                files = [(v.filename or k, await v.read()) for k, v in form.multi_items()
                         if isinstance(v, UploadFile)]
        except Exception as e:  # the multipart parser raises several types for malformed bodies
            reason = getattr(e, "detail", None) or str(e)
            raise HTTPError(400, f"malformed multipart body: {reason}", "bad_request") from e
        if not files:
            raise HTTPError(400, "multipart body has no file parts", "bad_request")
        return files
