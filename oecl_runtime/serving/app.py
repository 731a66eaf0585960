"""The ASGI app of `oecl serve`: one batcher, one set of metrics and limits, and the protocols
that feed them (`/v1/score` in `v1`, the Open Inference Protocol in `v2_rest` and `v2_grpc`).

What the protocols share lives here: the body read under its size and time limits, decoding
off the event loop (a bounded number at once, stopped when the client goes away), the
request's pixel total, the hand-off to the batcher, and the one mapping of a failure to its
status and /metrics reason. `/healthz`, `/v1/model`, `/metrics` and the lifespan (the
batcher's start and drain, the gRPC server) are small starlette routes.

Work is bounded before it is done: 413 for a body over the size limit, for more images than the
queue holds or for decoded pixels over the caps (read from image headers); 415 for an image
format outside the accepted list; 503 + Retry-After when the queue is full, `max_requests`
score requests are past their body or `max_buffered_bytes` of bodies are still arriving; 408
when headers (see `http_timeouts`) or the body do not arrive in time. Open connections are
capped apart from requests (`max_connections`, oldest idle closed first: `http_timeouts`), and
a slow upload holds no request slot, so idle and slow sockets cannot lock clients out. A
multi-image request whose client goes away stops decoding and leaves the queue. A model output
that is not a finite number is an error for its image, never a score.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..batcher import Draining, DynamicBatcher, QueueFull, TooManyImages
from ..inputs import Abandoned, load_each
from ..metrics import CONTENT_TYPE, ServerMetrics
from ..preprocess import ImageError, UnsupportedFormat, open_image
from ..scorer import ScoreError, Scorer
from . import v2_grpc
from .common import HTTPError
from .config import ServerConfig
from .v1 import SCORE_PATH, V1Score
from .v2_rest import V2Rest

# One logger for the whole server, whichever module logs: its name is what operators filter on.
log = logging.getLogger("oecl_runtime.server")


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
    """The ASGI app: POST /v1/score (`v1`) and /v2 (`v2_rest`) are plain ASGI handlers,
    everything else (and the lifespan) is starlette."""

    def __init__(self, scorer: Scorer, cfg: ServerConfig, close_scorer: bool = False) -> None:
        self.scorer, self.cfg = scorer, cfg
        self.spec = scorer.spec
        self.chw = (self.spec.channels, self.spec.height, self.spec.width)
        policy = cfg.batch
        self.max_batch = min(policy.max_batch or scorer.batch_size, scorer.batch_size)
        if self.max_batch > policy.max_queue:
            self.max_batch = policy.max_queue
        metrics = self.metrics = ServerMetrics(
            self.max_batch, {"backend": scorer.backend.name,
                             "precision": scorer.backend.precision})

        def on_batch(n: int, seconds: float) -> None:
            metrics.batch_size.observe(n)
            metrics.inference.observe(seconds)
            metrics.images.inc(n)

        self.batcher = DynamicBatcher(scorer.score_array, self.chw,
                                      replace(policy, max_batch=self.max_batch), on_batch)
        self.batcher.on_depth = metrics.queue_depth.set
        self._decodes = asyncio.Semaphore(max(1, cfg.decode_threads))
        self._buffered = 0  # bytes of bodies still arriving, across requests
        self._close_scorer = close_scorer
        self.v1 = V1Score(self)
        self.v2 = V2Rest(self, cfg.model_name)
        self.inner = self._starlette()
        self.state = self.inner.state
        self.state.batcher, self.state.metrics = self.batcher, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == SCORE_PATH:
            await self.v1(scope, receive, send)
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

    # ---- what every protocol's requests share

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

    # ---- the other routes

    def _starlette(self) -> Starlette:
        scorer, cfg, metrics, policy = self.scorer, self.cfg, self.metrics, self.cfg.batch

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
                       "max_delay_ms": policy.max_delay_ms, "max_queue": policy.max_queue,
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
                     policy.max_delay_ms, policy.max_queue)
            try:
                yield
            finally:
                if grpc_server is not None:  # in-flight calls get the HTTP side's grace
                    await grpc_server.stop(cfg.graceful_timeout_s)
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
