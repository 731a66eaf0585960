"""`oecl serve`: the scoring server (`serving`) on one port, in one process or several. Its
settings' options are built from the configuration's fields (`serving.config`), defaults and
help texts included."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..serving.config import REQUEST_PIXELS_IN_IMAGES, BatchPolicy, ProcessConfig, ServerConfig
from .common import backend_options, config_from, field_options, model_option, open_scorer, say


@click.command("serve")
@model_option
@field_options(ProcessConfig, "host", "port")
@backend_options
@click.option("--threshold", type=float, default=None,
              help="Default threshold (a request's ?threshold= overrides it).")
@field_options(BatchPolicy, "max_batch", "max_delay_ms", "max_queue")
@field_options(ServerConfig, "max_body_mb", "max_image_pixels", "header_timeout_s",
               "body_timeout_s", "max_connections")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes on the one port, each with its own backend; CPU threads "
                   "are split among them (see --threads) and /metrics sums all of them. "
                   "Workers exit with the server process.")
@field_options(ProcessConfig, "log_level", "access_log")
@field_options(ServerConfig, "model_name", "grpc_port")
def serve(model_dir: Path, backend: str, precision: str | None, threads: int | None,
          threshold: float | None, workers: int, **options: Any) -> None:
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
    from ..serving.process import listen_socket, serve_workers, serving_threads
    from ..serving.process import serve as run_server
    from ..serving.v2_grpc import missing

    process = config_from(ProcessConfig, options)
    logging.basicConfig(level=process.log_level.upper(),
                        format="%(levelname)s: %(name)s: %(message)s")
    try:  # before the model loads: a port in use is one line, for one worker or many
        sock = listen_socket(process.host, process.port)
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None
    if process.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {process.host}, reachable from other machines")
    pixels = options["max_image_pixels"]
    # A per-image cap given here sets the request's too, as that many images' worth.
    limits = {} if pixels is None else {"max_request_pixels": REQUEST_PIXELS_IN_IMAGES * pixels}
    cfg = config_from(ServerConfig, options, batch=config_from(BatchPolicy, options),
                      grpc_host=process.host, **limits)
    if cfg.grpc_port:
        if (why := missing()) is not None:
            raise click.ClickException(why)
    if threads is None:
        threads = serving_threads(workers)
    if workers > 1:
        # Opened once here so that a bad artifact fails with one line before any worker starts.
        open_scorer(model_dir, backend, precision, threshold, threads=threads).close()
        serve_workers(str(model_dir), workers, backend=backend, precision=precision,
                      threshold=threshold, threads=threads, config=cfg, process=process,
                      sock=sock)
        return
    scorer = open_scorer(model_dir, backend, precision, threshold, threads=threads)
    try:
        run_server(scorer, config=cfg, process=process, sock=sock)
    finally:
        scorer.close()
