"""`oecl serve`: the scoring server (`serving`) on one port, in one process or several."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..names import TRITON_MODEL_NAME
from .common import backend_options, check_model_name, model_option, open_scorer, say


@click.command("serve")
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@backend_options
@click.option("--threshold", type=float, default=None,
              help="Default threshold (a request's ?threshold= overrides it).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Largest inference batch; default: the backend's maximum.")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Longest an image waits for its batch to fill.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images waiting for inference before requests get 503.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=16.0,
              show_default=True, help="Largest request body; larger ones get 413.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None,
              help="Decoded pixels allowed per image, checked from its header  [default: "
                   "4096x4096]; larger images get 400.")
@click.option("--header-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds a client has to send its request headers (0: no limit); 408 after.")
@click.option("--body-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds a client has to send its request body (0: no limit); 408 after.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Open connections per worker, idle ones included; a new one over it closes "
                   "the one idle longest (lowered to fit the open-file limit).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes on the one port, each with its own backend; CPU threads "
                   "are split among them (see --threads) and /metrics sums all of them. "
                   "Workers exit with the server process.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--access-log", is_flag=True, help="Log every request (off: /metrics counts them).")
@click.option("--model-name", default=TRITON_MODEL_NAME, show_default=True,
              callback=lambda ctx, param, v: check_model_name(v),
              help="The model's name under /v2/models/ (as `oecl triton-repo --name`).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Also serve the Open Inference Protocol over gRPC on this port (0: off; "
                   "needs the grpc extra).")
def serve(model_dir: Path, host: str, port: int, backend: str, precision: str | None,
          threads: int | None, threshold: float | None, max_batch: int | None,
          max_delay_ms: float, max_queue: int, max_body_mb: float,
          max_image_pixels: int | None, header_timeout: float, body_timeout: float,
          max_connections: int, workers: int, log_level: str, access_log: bool,
          model_name: str, grpc_port: int) -> None:
    """HTTP scoring server with dynamic batching. norm: higher = normal.

    POST /v1/score (a PNG, JPEG, BMP or GIF body, multipart files, or application/x-npy),
    GET /healthz, GET /v1/model, GET /metrics; the Open Inference Protocol (KServe v2, as
    Triton speaks it) under /v2: POST /v2/models/<model-name>/infer with `images` (UINT8
    [N, C, H, W]) or `image_bytes` (BYTES [N, 1]), JSON or binary tensors, outputs `norm` and
    `is_anomaly`; the same over gRPC with --grpc-port.
    SIGTERM finishes in-flight requests before exiting.
    Without --threads, each worker's backend gets the cores shared among the workers; on a
    machine shared with other busy work, --threads below the core count can serve more
    (onnxruntime's idle pool threads spin and compete with the event loop).
    """
    # Deferred: the server loads numpy, starlette and uvicorn.
    from ..serving.config import ServerConfig
    from ..serving.process import listen_socket, serve_workers, serving_threads
    from ..serving.process import serve as run_server
    from ..serving.v2_grpc import missing

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:  # before the model loads: a port in use is one line, for one worker or many
        sock = listen_socket(host, port)
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {host}, reachable from other machines")
    limits = {} if max_image_pixels is None else {
        "max_image_pixels": max_image_pixels,
        "max_request_pixels": 4 * max_image_pixels}
    cfg = ServerConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                       max_body_mb=max_body_mb, header_timeout_s=header_timeout,
                       body_timeout_s=body_timeout, max_connections=max_connections,
                       model_name=model_name, grpc_port=grpc_port, grpc_host=host, **limits)
    if grpc_port:
        if (why := missing()) is not None:
            raise click.ClickException(why)
    if threads is None:
        threads = serving_threads(workers)
    if workers > 1:
        # Opened once here so that a bad artifact fails with one line before any worker starts.
        open_scorer(model_dir, backend, precision, threshold, threads=threads).close()
        serve_workers(str(model_dir), workers, backend=backend, precision=precision,
                      threshold=threshold, threads=threads, host=host, port=port, config=cfg,
                      log_level=log_level, access_log=access_log, sock=sock)
        return
    scorer = open_scorer(model_dir, backend, precision, threshold, threads=threads)
    try:
        run_server(scorer, host=host, port=port, config=cfg, log_level=log_level,
                   access_log=access_log, sock=sock)
    finally:
        scorer.close()
