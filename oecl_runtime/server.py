"""HTTP scoring service (starlette + uvicorn) with dynamic batching on one inference thread.

Request handlers read and decode images in the thread pool, then hand uint8 arrays to the
batcher; the inference thread only runs the backend. Limits answer early instead of queueing:
413 for a body over the size limit, 503 + Retry-After when the image queue is full.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from .batcher import Draining, DynamicBatcher, QueueFull, TooManyImages
from .inputs import to_batch
from .metrics import CONTENT_TYPE, ServerMetrics
from .preprocess import ImageError
from .scorer import Scorer

log = logging.getLogger("oecl_runtime.server")

NPY_TYPE = "application/x-npy"


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int | None = None  # None: the backend's maximum
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images waiting for inference, across all requests
    max_body_mb: float = 16.0
    retry_after_s: int = 1

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class HTTPError(Exception):
    def __init__(self, status: int, reason: str, kind: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = HTTPError(413, f"request body exceeds the {limit} byte limit", "too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    # Also counted while streaming: a chunked upload declares no length.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_files(request: Request, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_part_size=limit) as form:
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items()
                     if isinstance(v, UploadFile)]
    except Exception as e:  # the multipart parser raises several types for malformed bodies
        reason = getattr(e, "detail", None) or str(e)
        raise HTTPError(400, f"malformed multipart body: {reason}", "bad_request") from e
    if not files:
        raise HTTPError(400, "multipart body has no file parts", "bad_request")
    return files


def _decode_npy(body: bytes, scorer: Scorer) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for bad .npy data
        raise ImageError(f"body is not a valid .npy array: {e}") from e
    return to_batch(arr, scorer.spec)


def _threshold(request: Request, scorer: Scorer) -> float:
    raw = request.query_params.get("threshold")
    if raw is None:
        return scorer.threshold
    try:
        t = float(raw)
    except ValueError:
        raise HTTPError(400, f"threshold must be a number, got {raw!r}", "bad_request") from None
    if t != t or t in (float("inf"), float("-inf")):
        raise HTTPError(400, "threshold must be finite", "bad_request")
    return t


def create_app(scorer: Scorer, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app; the batcher starts and drains with the app's lifespan."""
    cfg = config or ServerConfig()
    max_batch = min(cfg.max_batch or scorer.batch_size, scorer.batch_size)
    spec = scorer.spec
    metrics: ServerMetrics

    def on_batch(n: int, seconds: float) -> None:
        metrics.batch_size.observe(n)
        metrics.inference.observe(seconds)
        metrics.images.inc(n)

    batcher = DynamicBatcher(
        scorer.score_array, (spec.channels, spec.height, spec.width), max_batch,
        cfg.max_delay_ms / 1000.0, cfg.max_queue, on_batch,
    )
    metrics = ServerMetrics(max_batch, lambda: batcher.depth,
                            {"backend": scorer.backend.name, "precision": scorer.backend.precision})

    def counted(path: str, handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            response = await handler(request)
            metrics.requests.inc(path=path, code=str(response.status_code))
            return response

        return wrapped

    async def score(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            threshold = _threshold(request, scorer)
            body = await _read_body(request, cfg.max_body_bytes)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            names: list[str] | None = None
            if ctype == "multipart/form-data":
                files = await _multipart_files(request, body, cfg.max_body_bytes)
                names = [name for name, _ in files]
                batch = await run_in_threadpool(to_batch, [b for _, b in files], scorer.spec)
            elif not body:
                raise HTTPError(400, "empty body: send an image, multipart files or an .npy",
                                "bad_request")
            elif ctype == NPY_TYPE:
                batch = await run_in_threadpool(_decode_npy, body, scorer)
            else:
                batch = await run_in_threadpool(to_batch, [body], scorer.spec)
            norms = await asyncio.wrap_future(batcher.submit(batch))
        except HTTPError as e:
            metrics.errors.inc(reason=e.kind)
            return JSONResponse({"error": e.reason}, e.status, headers=e.headers)
        except ImageError as e:
            metrics.errors.inc(reason="bad_image")
            return JSONResponse({"error": str(e)}, 400)
        except TooManyImages as e:
            metrics.errors.inc(reason="too_large")
            return JSONResponse({"error": str(e)}, 413)
        except (QueueFull, Draining) as e:
            metrics.errors.inc(reason="queue_full" if isinstance(e, QueueFull) else "draining")
            return JSONResponse({"error": str(e)}, 503,
                                headers={"Retry-After": str(cfg.retry_after_s)})
        except Exception as e:  # a backend failure is this request's 500, not the server's end
            log.exception("inference failed")
            metrics.errors.inc(reason="inference")
            return JSONResponse({"error": f"inference failed: {e}"}, 500)
        results = [{"norm": float(x), "is_anomaly": bool(x < threshold)} for x in norms]
        if names is not None:
            for r, name in zip(results, names, strict=True):
                r["name"] = name
        metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse({"score": scorer.artifact.score_name, "direction": "higher_is_normal",
                             "threshold": threshold, "results": results})

    async def healthz(request: Request) -> Response:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "draining", "backend": scorer.backend.name,
                             "queue_depth": batcher.depth}, 200 if ok else 503)

    async def model(request: Request) -> Response:
        runtime = {**scorer.describe(), "max_batch": max_batch,
                   "max_delay_ms": cfg.max_delay_ms, "max_queue": cfg.max_queue,
                   "max_body_bytes": cfg.max_body_bytes}
        return JSONResponse({**scorer.meta, "runtime": runtime})

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        log.info("scoring with %s (%s), batches up to %d or %.1f ms, queue %d images",
                 scorer.backend.name, scorer.backend.precision, max_batch, cfg.max_delay_ms,
                 cfg.max_queue)
        try:
            yield
        finally:
            # uvicorn runs this after in-flight requests finish; drain whatever is still queued.
            await run_in_threadpool(batcher.close, True)

    routes = [
        Route("/v1/score", counted("/v1/score", score), methods=["POST"]),
        Route("/healthz", counted("/healthz", healthz), methods=["GET"]),
        Route("/v1/model", counted("/v1/model", model), methods=["GET"]),
        Route("/metrics", counted("/metrics", metrics_endpoint), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    return app


def _draining_server_class():
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn drains on SIGTERM, then re-raises the signal, which kills the process before
        the caller's cleanup runs and makes a clean stop exit 143. A drained SIGTERM is a
        normal stop here: the process returns and exits 0."""

        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return DrainingServer


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


def serve(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    log_level: str = "info",
    graceful_timeout_s: int = 30,
    access_log: bool = False,
) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before it exits.

    Access logging is off by default: at thousands of requests a second it costs more CPU than
    the rest of the request path, and /metrics already counts every request.
    """
    import uvicorn

    cfg = config or ServerConfig()
    app = create_app(scorer, cfg)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout_s,
        # Bounds the requests (and their bodies) held in memory; beyond it uvicorn answers 503.
        limit_concurrency=max(64, 2 * cfg.max_queue),
    )
    stack = http_stack()
    log.info("uvicorn %s, http %s, event loop %s", stack["uvicorn"], stack["http"], stack["loop"])
    _draining_server_class()(uv_config).run()
