"""HTTP scoring service (uvicorn; starlette for the small routes) with dynamic batching.

`POST /v1/score` is a plain ASGI handler rather than a starlette route: at thousands of
one-image requests a second, routing, `Request` objects, thread-pool hops and per-request
future hand-offs cost several times the PNG decode, and throttled a fast backend. The handler
decodes small images on the event loop (cheaper than a thread hop) when their cost is bounded
by a small constant (a small body, few pixels, no compressed metadata, no progressive scans),
everything else in the thread pool with a bounded number at once, and hands uint8 arrays to
the batcher, whose inference thread wakes the loop once per batch.

Work is bounded before it is done: 413 for a body over the size limit, for more images than the
queue holds (counted from an `.npy` header or the multipart boundaries) or for decoded pixels
over the caps (read from image headers); 415 for an image format outside the accepted list;
503 + Retry-After when the queue is full, `max_requests` score requests are past their body
or `max_buffered_bytes` of bodies are still arriving; 408 when headers (see `http_timeouts`)
or the body do not arrive in time. Open connections are capped apart from requests
(`max_connections`, oldest idle closed first: `http_timeouts`), and a slow upload holds no
request slot, so idle and slow sockets cannot lock clients out. A multi-image request whose
client goes away stops decoding and leaves the queue. A model output that is not a finite
number is an error for its image (500 for a request of one), never a score.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .batcher import Draining, DynamicBatcher, QueueFull, TooManyImages
from .inputs import Abandoned, load_each, npy_array, to_batch
from .metrics import CONTENT_TYPE, MULTIPROC_ENV, ServerMetrics
from .names import TRITON_MODEL_NAME
from .preprocess import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageError,
    UnsupportedFormat,
    load,
    load_opened,
    open_image,
)
from .scorer import ScoreError, Scorer, check_threshold, non_finite
from .serving import v2_grpc
from .serving.common import HTTPError, inline_body, inline_decode
from .serving.v2_rest import V2Rest

log = logging.getLogger("oecl_runtime.server")

NPY_TYPE = "application/x-npy"
SCORE_PATH = "/v1/score"
_BODY_KINDS = (f"{'/'.join(ACCEPTED_FORMATS)} image bytes (any Content-Type), an .npy array as "
               f"{NPY_TYPE}, or images as multipart/form-data files")


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int | None = None  # None: the backend's maximum
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images waiting for inference, across all requests
    max_body_mb: float = 16.0
    retry_after_s: int = 1
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixels per image
    max_request_pixels: int = 4 * DEFAULT_MAX_PIXELS  # decoded pixels per request, all images
    decode_threads: int = 2  # images decoded off the event loop at once, across requests
    header_timeout_s: float = 10.0  # 0: no limit
    body_timeout_s: float = 30.0  # whole body, from the end of the headers; 0: no limit
    model_name: str = TRITON_MODEL_NAME  # the model's name under /v2 (Open Inference Protocol)
    grpc_port: int = 0  # the Open Inference Protocol over gRPC on this port; 0: off
    grpc_host: str = "127.0.0.1"
    # Open connections, idle ones included; over it the one idle longest is closed. Lowered
    # to what the open-file limit leaves room for (`connection_cap`).
    max_connections: int = 1024

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_requests(self) -> int:
        """Score requests past their body at once (decoding, queued or running); beyond it a
        request gets 503. Counts requests, not sockets."""
        return max(64, 2 * self.max_queue)

    @property
    def max_buffered_bytes(self) -> int:
        """Bytes of request bodies still arriving, across requests, before a 503: bounds the
        memory slow uploads hold (each also holds a connection until the body timeout)."""
        return max(64, 2 * self.max_queue) * self.max_body_bytes // 8


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


class _Deadline:
    """Cancel the current task after `seconds` (no extra task per request, unlike wait_for)."""

    __slots__ = ("expired", "_handle", "_task")

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._task = asyncio.current_task()
        self._handle = (asyncio.get_running_loop().call_later(seconds, self._fire)
                        if seconds > 0 else None)

    def _fire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def absorb(self) -> None:
        """After catching the CancelledError this deadline caused: clear the request."""
        if self._task is not None and hasattr(self._task, "uncancel"):
            self._task.uncancel()


class ScoringApp:
    """The ASGI app: POST /v1/score here, everything else (and the lifespan) in starlette."""

    def __init__(self, scorer: Scorer, cfg: ServerConfig, close_scorer: bool = False) -> None:
        self.scorer, self.cfg = scorer, cfg
        self.spec = scorer.spec
        self.chw = (self.spec.channels, self.spec.height, self.spec.width)
        self.max_batch = min(cfg.max_batch or scorer.batch_size, scorer.batch_size)
        if self.max_batch > cfg.max_queue:
            self.max_batch = cfg.max_queue
        metrics = self.metrics = ServerMetrics(
            self.max_batch, {"backend": scorer.backend.name,
                             "precision": scorer.backend.precision})

        def on_batch(n: int, seconds: float) -> None:
            metrics.batch_size.observe(n)
            metrics.inference.observe(seconds)
            metrics.images.inc(n)

        self.batcher = DynamicBatcher(scorer.score_array, self.chw, self.max_batch,
                                      cfg.max_delay_ms / 1000.0, cfg.max_queue, on_batch)
        self.batcher.on_depth = metrics.queue_depth.set
        self._decodes = asyncio.Semaphore(max(1, cfg.decode_threads))
        self._in_flight = 0  # score requests past their body: decoding, queued or running
        self._buffered = 0  # bytes of bodies still arriving, across requests
        self._close_scorer = close_scorer
        self.v2 = V2Rest(self, cfg.model_name)
        self.inner = self._starlette()
        self.state = self.inner.state
        self.state.batcher, self.state.metrics = self.batcher, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == SCORE_PATH:
            await self._score_endpoint(scope, receive, send)
        elif scope["type"] == "http" and scope["path"].startswith("/v2"):
            await self.v2(scope, receive, send)
        else:
            await self.inner(scope, receive, send)

    def _busy(self, what: str) -> HTTPError:
        return HTTPError(503, f"server has {what} in progress, its limit; retry later", "busy",
                         {"Retry-After": str(self.cfg.retry_after_s), "Connection": "close"})

    def on_header_timeout(self) -> None:
        """Counts a 408 for late headers, sent by the HTTP protocol (`http_timeouts`) before
        the request could reach the app."""
        self.metrics.error("timeout")

    def on_connection_shed(self) -> None:
        """Counts an idle connection closed to make room for a new one (`http_timeouts`)."""
        self.metrics.connection("shed_idle")

    def on_connection_refused(self) -> None:
        """Counts a new connection turned away: every open one had a request in progress."""
        self.metrics.connection("refused")

    # ---- POST /v1/score

    async def _score_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        if scope["method"] != "POST":
            status, payload, headers = 405, {"error": "method not allowed; use POST"}, {
                "Allow": "POST"}
        else:
            status, payload, headers = await self._score(scope, receive)
        await _send_json(send, status, payload, headers)
        self.metrics.request(SCORE_PATH, status)
        if status == 200:
            self.metrics.latency.observe(time.perf_counter() - t0)

    async def _score(self, scope: Scope, receive: Receive
                     ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        try:
            threshold = _threshold(scope["query_string"], self.scorer.threshold)
            ctype, length = "", None
            for k, v in scope["headers"]:
                if k == b"content-type":
                    ctype = v.decode("latin-1")
                elif k == b"content-length":
                    length = v
            body = await self._read_body(receive, length)
            # Counted from here, where the work starts: a slow upload holds a connection (the
            # connection cap) and its bytes so far (`max_buffered_bytes`), not a request slot.
            if self._in_flight >= self.cfg.max_requests:
                raise self._busy(f"{self.cfg.max_requests} score requests")
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
                norms = await self._infer(batch, receive)
            finally:
                self._in_flight -= 1
        except Exception as e:
            return self._failure(e)
        values = norms.tolist()
        return self._answer(threshold, [_result(x, threshold) for x in values], values)

    def _answer(self, threshold: float, results: list[dict[str, Any]], values: list[float]
                ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """200 with per-image results, where a non-finite score is its image's error; 500 when
        that leaves no image of the request scored (for one image: its only answer)."""
        if not all(map(math.isfinite, values)):
            self.metrics.error("non_finite")
            if not any("norm" in r for r in results):
                first = next(x for x in values if not math.isfinite(x))
                return 500, {"error": non_finite(first), "results": results}, None
        return 200, self._payload(threshold, results), None

    def _failure(self, e: Exception) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """The response to a request that failed with `e` (any protocol), counted by reason."""
        m = self.metrics
        if isinstance(e, HTTPError):
            m.error(e.kind)
            return e.status, {"error": e.reason}, e.headers
        if isinstance(e, ScoreError):  # a non-finite norm: the model's fault, never "normal"
            m.error("non_finite")
            return 500, {"error": str(e)}, None
        if isinstance(e, UnsupportedFormat):
            m.error("bad_format")
            return 415, {"error": str(e)}, None
        if isinstance(e, ImageError):
            m.error("bad_image")
            return 400, {"error": str(e)}, None
        if isinstance(e, TooManyImages):
            m.error("too_large")
            return 413, {"error": str(e)}, None
        if isinstance(e, (QueueFull, Draining)):
            m.error("queue_full" if isinstance(e, QueueFull) else "draining")
            return 503, {"error": str(e)}, {"Retry-After": str(self.cfg.retry_after_s)}
        if isinstance(e, Abandoned):
            m.error("client_gone")
            return 400, {"error": "client went away"}, None
        # A backend failure is this request's 500, not the server's end.
        log.error("inference failed", exc_info=e)
        m.error("inference")
        return 500, {"error": f"inference failed: {e}"}, None

    def _payload(self, threshold: float, results: list[dict[str, Any]]) -> dict[str, Any]:
        # `score` names what each `norm` holds: the plain norm or the K-view mean-view-norm.
        return {"score": self.scorer.artifact.score_name, "direction": "higher_is_normal",
                "threshold": threshold, "results": results}

    async def _read_body(self, receive: Receive, declared: bytes | None) -> bytes:
        limit = self.cfg.max_body_bytes
        too_big = HTTPError(413, f"request body exceeds the {limit} byte limit", "too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        deadline = _Deadline(self.cfg.body_timeout_s)
        size = 0
        try:
            msg = await receive()
            body = msg.get("body", b"")
            if msg.get("more_body"):
                # Also counted while streaming: a chunked upload declares no length.
                chunks, size = [body], len(body)
                self._buffered += size
                while msg.get("more_body"):
                    if self._buffered > self.cfg.max_buffered_bytes:
                        raise self._busy(f"{self._buffered} bytes of request bodies")
                    msg = await receive()
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    self._buffered += len(chunk)
                    if size > limit:
                        raise too_big
                    chunks.append(chunk)
                body = b"".join(chunks)
            if msg["type"] == "http.disconnect":
                raise Abandoned
        except asyncio.CancelledError:
            if not deadline.expired:
                raise
            deadline.absorb()
            raise HTTPError(408, f"request body not received within {self.cfg.body_timeout_s:g} s",
                            "timeout", {"Connection": "close"}) from None
        finally:
            deadline.cancel()
            self._buffered -= size
        if len(body) > limit:
            raise too_big
        return body

    async def _decode_one(self, data: bytes, ctype: str) -> np.ndarray:
        cap = self.cfg.max_image_pixels
        try:
            if inline_body(data):
                img = open_image(data, "image bytes", cap)
                if inline_decode(img):
                    return load_opened(img, self.spec, "image bytes", cap)
                async with self._decodes:
                    return await run_in_threadpool(load_opened, img, self.spec, "image bytes", cap)
            async with self._decodes:
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
        return await self._off_loop(receive, to_batch, arr, self.spec, self.cfg.max_image_pixels)

    async def _off_loop(self, receive: Receive, fn: Callable[..., Any], *args: Any) -> Any:
        """Run decode work in the thread pool (a bounded number at once) while watching for
        the client to go away; if it does, the work stops at the next image."""
        stop = threading.Event()

        async def watch() -> None:
            # The body has been read: the next message is the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            stop.set()

        watcher = asyncio.ensure_future(watch())
        try:
            async with self._decodes:
                if stop.is_set():
                    raise Abandoned
                return await run_in_threadpool(fn, *args, stop=stop)
        finally:
            watcher.cancel()

    async def _infer(self, batch: np.ndarray, receive: Receive | None = None) -> np.ndarray:
        """Queue `batch`; with `receive` (requests of several images), a client that goes away
        takes its images that have not run yet out of the queue."""
        future = self.batcher.submit(batch)
        if receive is None or len(batch) <= 1:
            return await future

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            future.cancel()  # the batcher skips the images of a cancelled request

        watcher = asyncio.ensure_future(watch())
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled() and watcher.done():
                raise Abandoned from None
            raise
        finally:
            watcher.cancel()

    async def _score_multipart(self, body: bytes, ctype: str, receive: Receive,
                               threshold: float
                               ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        files = await self._multipart_files(body, ctype)
        names = [name for name, _ in files]
        # Headers are read off the event loop too: the parts may hold megabytes.
        batch, errors = await self._off_loop(receive, self._open_and_load, files)
        if errors.count(None) == 0:
            self.metrics.error("bad_image")
            return 400, {"error": f"no part could be read; first: {errors[0]}",
                         "results": [{"name": n, "error": e} for n, e in zip(names, errors,
                                                                             strict=True)]}, None
        if any(errors):
            self.metrics.error("bad_image")
        values = (await self._infer(batch, receive)).tolist()
        norms = iter(values)
        results = [{"name": name, **(_result(next(norms), threshold) if err is None
                                     else {"error": err})}
                   for name, err in zip(names, errors, strict=True)]
        return self._answer(threshold, results, values)

    def _open_and_load(self, files: list[tuple[str, bytes]], stop: threading.Event
                       ) -> tuple[np.ndarray, list[str | None]]:
        """In the thread pool: every part's header, the request's pixel total, then the
        decode (`load_each`)."""
        cap = self.cfg.max_image_pixels
        opened: list[Any] = []
        total = 0
        for name, data in files:
            if stop.is_set():
                raise Abandoned
            try:
                img = open_image(data, name, cap)  # reads the header only
                total += img.width * img.height
                opened.append(img)
            except ImageError as e:
                opened.append(e)
        if total > self.cfg.max_request_pixels:
            raise HTTPError(413, f"the images hold {total} decoded pixels, over the limit of "
                                 f"{self.cfg.max_request_pixels} per request", "too_large")
        return load_each(opened, [name for name, _ in files], self.spec, cap, stop)

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

    # ---- the other routes

    def _starlette(self) -> Starlette:
        scorer, cfg, metrics = self.scorer, self.cfg, self.metrics

        def counted(path: str, handler: Callable[[Request], Awaitable[Response]]
                    ) -> Callable[[Request], Awaitable[Response]]:
            async def wrapped(request: Request) -> Response:
                response = await handler(request)
                metrics.request(path, response.status_code)
                return response

            return wrapped

        async def healthz(request: Request) -> Response:
            ok = self.batcher.alive
            return JSONResponse({"status": "ok" if ok else "draining",
                                 "backend": scorer.backend.name,
                                 "queue_depth": self.batcher.depth}, 200 if ok else 503)

        async def model(request: Request) -> Response:
            runtime = {**scorer.describe(), "max_batch": self.max_batch,
                       "max_delay_ms": cfg.max_delay_ms, "max_queue": cfg.max_queue,
                       "max_body_bytes": cfg.max_body_bytes,
                       "max_image_pixels": cfg.max_image_pixels,
                       "max_request_pixels": cfg.max_request_pixels,
                       "header_timeout_s": cfg.header_timeout_s,
                       "body_timeout_s": cfg.body_timeout_s, "pid": os.getpid()}
            return JSONResponse({**scorer.meta, "runtime": runtime})

        async def metrics_endpoint(request: Request) -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

        async def http_error(request: Request, exc: Exception) -> Response:
            # 404 and 405 answer JSON like every other error of this API.
            assert isinstance(exc, HTTPException)
            metrics.request(request.url.path if exc.status_code != 404 else "other",
                            exc.status_code)
            return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.batcher.start()
            grpc_server = await v2_grpc.start(self.v2, cfg.grpc_host, cfg.grpc_port) \
                if cfg.grpc_port else None
            log.info("scoring with %s (%s), batches up to %d or %.1f ms, queue %d images",
                     scorer.backend.name, scorer.backend.precision, self.max_batch,
                     cfg.max_delay_ms, cfg.max_queue)
            try:
                yield
            finally:
                if grpc_server is not None:  # in-flight calls get the HTTP side's grace
                    await grpc_server.stop(30)
                # uvicorn runs this after in-flight requests finish; drain what is still queued.
                await run_in_threadpool(self.batcher.close, True)
                if self._close_scorer:
                    scorer.close()

        routes = [
            Route("/healthz", counted("/healthz", healthz), methods=["GET"]),
            Route("/v1/model", counted("/v1/model", model), methods=["GET"]),
            Route("/metrics", counted("/metrics", metrics_endpoint), methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: http_error})


def create_app(scorer: Scorer, config: ServerConfig | None = None) -> ScoringApp:
    """The ASGI app; the batcher starts and drains with the app's lifespan."""
    return ScoringApp(scorer, config or ServerConfig())


# ----------------------------------------------------------------------------- running it


def http_stack() -> dict[str, str]:
    """What uvicorn's "auto" settings will run on: httptools and uvloop when installed (C
    parsing and event loop), else h11 and asyncio (pure Python, slower per request)."""
    from importlib.metadata import PackageNotFoundError, version

    def have(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    http, loop = have("httptools"), have("uvloop")
    return {"uvicorn": have("uvicorn") or "missing",
            "http": f"httptools {http}" if http else "h11",
            "loop": f"uvloop {loop}" if loop else "asyncio"}


class PortInUse(OSError):
    """The address to listen on is taken; the message says what to do."""


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here (as uvicorn would) so that a port in use is
    one line before anything starts, for one worker or many, rather than uvicorn's raw error
    after the app has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(e.errno, f"port {port} on {host} is in use: pick another with "
                                     "--port") from None
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    # Listening at once holds the port for good (two SO_REUSEADDR sockets may both be bound
    # until one listens); connections made while the model loads wait in the backlog.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# Descriptors kept back from the connection cap for the model files, threads, pipes and logs.
_RESERVED_FDS = 128


def connection_cap(wanted: int) -> int:
    """`wanted` open connections, or fewer when the open-file limit cannot hold them (after
    raising the soft limit toward the hard one, as far as that goes)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    cap = max(16, soft - _RESERVED_FDS)
    log.warning("open-file limit %d holds %d connections, not the %d asked for (raise it with "
                "`ulimit -n`)", soft, cap, wanted)
    return cap


def _uvicorn_config(app: Any, host: str, port: int, cfg: ServerConfig, log_level: str,
                    graceful_timeout_s: int, access_log: bool, **extra: Any) -> Any:
    from .http_timeouts import protocol_name

    # No `limit_concurrency`: uvicorn counts sockets with it, so idle connections locked
    # clients out. Requests are bounded by the app (`max_requests`), connections by the
    # protocol (`max_connections`, oldest idle closed first).
    uv = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout_s, http=protocol_name(), **extra)
    # Read by the protocol (see http_timeouts); on the Config, so worker processes get them.
    uv.header_timeout_s = cfg.header_timeout_s
    uv.max_connections = connection_cap(cfg.max_connections)
    return uv


def serve(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    log_level: str = "info",
    graceful_timeout_s: int = 30,
    access_log: bool = False,
    sock: socket.socket | None = None,
) -> None:
    """Run the server in this process until SIGINT/SIGTERM; in-flight requests finish first.

    `sock`: a socket already bound by `listen_socket` (else bound here; PortInUse when the
    port is taken). Access logging is off by default: at thousands of requests a second it
    costs more CPU than the rest of the request path, and /metrics already counts every request.
    """
    cfg = config or ServerConfig()
    sock = sock or listen_socket(host, port)
    app = create_app(scorer, cfg)
    uv_config = _uvicorn_config(app, host, port, cfg, log_level, graceful_timeout_s, access_log)
    stack = http_stack()
    log.info("uvicorn %s, http %s, event loop %s", stack["uvicorn"], stack["http"], stack["loop"])
    log.info("listening on http://%s:%d", host, sock.getsockname()[1])
    DrainingServer(uv_config).run(sockets=[sock])


def serving_threads(workers: int = 1, cores: int | None = None) -> int:
    """CPU intra-op threads per worker when none are asked for: the cores shared among the
    workers. Leaving a core to the event loop measured slower on a quiet 2-core machine, for a
    16x16 and a 32x32 ResNet alike (benchmarks/RESULTS.md); it only helped while other jobs
    loaded the cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // workers)


# --workers N: uvicorn's supervisor starts N processes on one socket; each imports this module
# and calls `worker_app`, which opens its own scorer from the options in this variable.
_WORKER_ENV = "OECL_SERVE_WORKER"


def serve_workers(
    model_dir: str,
    workers: int,
    backend: str = "auto",
    precision: str | None = None,
    threshold: float | None = None,
    threads: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    log_level: str = "info",
    graceful_timeout_s: int = 30,
    access_log: bool = False,
    sock: socket.socket | None = None,
) -> None:
    """Run `workers` processes on one port, each with its own backend whose CPU threads share
    the cores (`threads` each; default: `serving_threads`), and /metrics summed across them.
    Workers end with this process, however it ends; a worker that dies is restarted and its
    gauges leave the sums. `sock` as for `serve`."""
    cfg = config or ServerConfig()
    sock = sock or listen_socket(host, port)
    if threads is None:
        threads = serving_threads(workers)
    metrics_dir = tempfile.mkdtemp(prefix="oecl-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    os.environ[_WORKER_ENV] = json.dumps({
        "model": str(model_dir), "backend": backend, "precision": precision,
        "threshold": threshold, "threads": threads, "config": asdict(cfg),
        "parent": os.getpid()})
    try:
        uv_config = _uvicorn_config(f"{__name__}:worker_app", host, port, cfg, log_level,
                                    graceful_timeout_s, access_log, factory=True,
                                    workers=workers)
        log.info("%d workers, %d CPU threads each; metrics across workers in %s", workers,
                 threads, metrics_dir)
        log.info("listening on http://%s:%d", host, sock.getsockname()[1])
        _supervisor()(uv_config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervisor() -> type:
    from uvicorn.supervisors import Multiprocess

    from .metrics import forget_process

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, which also takes a replaced worker's gauges out of /metrics."""

        def keep_subprocess_alive(self) -> None:
            before = [p.pid for p in self.processes]
            super().keep_subprocess_alive()
            for pid, proc in zip(before, self.processes, strict=False):
                if pid is not None and proc.pid != pid:
                    forget_process(pid)

    return Supervisor


def _die_with_parent(parent: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies, even by kill -9, so no orphan
    keeps the port. Linux's parent-death signal; elsewhere a thread watching the parent pid."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
        watch = False
    except (OSError, AttributeError):  # not Linux
        watch = True
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if watch:
        def watch_parent() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch_parent, name="oecl-parent-watch", daemon=True).start()


def worker_app() -> ScoringApp:
    """The app of one `--workers` process (called by uvicorn in that process)."""
    opts = json.loads(os.environ[_WORKER_ENV])
    _die_with_parent(opts["parent"])
    scorer = Scorer.open(opts["model"], backend=opts["backend"], precision=opts["precision"],
                         threshold=opts["threshold"], threads=opts["threads"])
    app = ScoringApp(scorer, ServerConfig(**opts["config"]), close_scorer=True)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn drains on SIGTERM, then re-raises the signal, which kills the process before
    the caller's cleanup runs and makes a clean stop exit 143. A drained SIGTERM is a
    normal stop here: the process returns and exits 0."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()
