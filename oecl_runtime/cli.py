"""The runtime's click commands (`oecl score`, `serve`, `bench`, `verify`, `engine`,
`triton-repo`) over the library.

Both `oecl` and `python -m oecl_runtime` (a box that has the runtime alone) list them from
`verbs.RUNTIME_VERBS`. Everything heavier than click is imported inside the command bodies.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .files import os_reason, regular_file_problem, short_path
from .names import (
    BACKEND_CHOICES,
    ENGINE_PRECISIONS,
    IMAGE_EXTENSIONS,
    PRECISIONS,
    TRITON_MODEL_NAME,
    valid_model_name,
)
from .verbs import RUNTIME_VERBS, VerbGroup

if TYPE_CHECKING:
    from .artifact import Artifact
    from .scorer import FileResult

_GLOB_CHARS = set("*?[")


def _model_option(f: Any) -> Any:
    return click.option("--model", "model_dir", required=True,
                        type=click.Path(exists=True, file_okay=False, path_type=Path),
                        help="Artifact directory (oecl.json + model files).")(f)


def _backend_options(f: Any) -> Any:
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU intra-op threads of onnxruntime-cpu / torch-cpu; default: one "
                          "per physical core.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="Model file precision; default: fp32 where present.")(f)
    return click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                        show_default=True,
                        help="auto: tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime-cpu.")(f)


def _open_scorer(model_dir: Path, backend: str, precision: str | None, threshold: float | None,
                 batch_size: int | None = None, threads: int | None = None) -> Any:
    from .artifact import METADATA_NAME, ArtifactError
    from .backends import BackendUnavailable
    from .scorer import Scorer

    if not (model_dir / METADATA_NAME).is_file() and (model_dir / "config.json").is_file():
        # A training run (what `oecl train` writes) is not servable until it is exported.
        raise click.ClickException(
            f"{model_dir} is a training run directory, not a model artifact (no "
            f"{METADATA_NAME}); make one with: oecl export {model_dir} --out DIR, then pass "
            "--model DIR"
        )
    try:
        return Scorer.open(model_dir, backend=backend, precision=precision, threshold=threshold,
                           batch_size=batch_size, threads=threads)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _model_name(name: str) -> str:
    if not valid_model_name(name):
        raise click.BadParameter(f"{name!r}: use letters, digits, '-', '_' or '.' (not first)")
    return name


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


# ----------------------------------------------------------------------------- score


class PathError(ValueError):
    """A path given to `oecl score` that does not exist: a usage error, not an error row."""


def expand_paths(paths: tuple[str, ...], problems: dict[str, str] | None = None) -> list[str]:
    """Files as given; directories walked recursively and globs expanded, keeping images only.

    Returns one entry per row `oecl score` writes, in order. Every path given must exist (a
    glob may match nothing): PathError names the first that does not. An entry that cannot be
    scored stays in the list with its reason in `problems`: a directory that cannot be listed,
    and anything but a regular file (a FIFO would block its read forever, a broken symlink has
    nothing to read). A named file is always kept; walked and globbed files are filtered by
    image extension.
    """
    out: list[str] = []
    found = {} if problems is None else problems

    def walk(d: str) -> Iterator[str]:
        unlisted: list[OSError] = []

        def directories_that_failed() -> Iterator[str]:
            # os.walk reports a directory it cannot list here, and otherwise leaves it out.
            while unlisted:
                e = unlisted.pop(0)
                where = os.fspath(e.filename) if e.filename is not None else d
                found[where] = f"cannot list this directory: {os_reason(e)}"
                yield where

        for root, dirs, files in os.walk(d, onerror=unlisted.append):
            yield from directories_that_failed()
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield os.path.join(root, name)
        yield from directories_that_failed()

    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            if isinstance(e, FileNotFoundError) and _GLOB_CHARS & set(p) \
                    and not os.path.islink(p):
                for m in sorted(glob.glob(p, recursive=True)):
                    if os.path.isdir(m):
                        out.extend(walk(m))
                    elif Path(m).suffix.lower() in IMAGE_EXTENSIONS:
                        out.append(m)
                continue
            raise PathError(f"{short_path(p)}: {regular_file_problem(p)}; give image files, "
                            "directories or globs that exist") from None
        if stat.S_ISDIR(mode):
            out.extend(walk(p))
        else:
            out.append(p)
    seen: set[str] = set()
    entries = [p for p in out if not (p in seen or seen.add(p))]
    for p in entries:
        if p not in found:
            reason = regular_file_problem(p)
            if reason is not None:
                found[p] = reason
    return entries


def _printable(text: str) -> str:
    """A file name that is not valid UTF-8 (held as surrogate escapes) with \\xNN for its odd
    bytes: a row file stays valid UTF-8 and still says which bytes the name has."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _RowWriter:
    """CSV or JSON-lines rows: path, norm, is_anomaly, error."""

    FIELDS = ("path", "norm", "is_anomaly", "error")

    def __init__(self, stream: Any, fmt: str) -> None:
        self.fmt, self.stream = fmt, stream
        if fmt == "csv":
            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(self.FIELDS)

    def write(self, r: FileResult) -> None:
        import numpy as np  # deferred: `oecl --help` does without numpy

        # str(float32) is the shortest text that reads back as the same float32.
        text = None if r.norm is None else str(np.float32(r.norm))
        path = _printable(r.path)
        error = None if r.error is None else _printable(r.error)
        if self.fmt == "csv":
            flag = "" if r.is_anomaly is None else str(r.is_anomaly).lower()
            self._csv.writerow((path, text or "", flag, error or ""))
        else:
            row = {"path": path, "norm": None if text is None else float(text),
                   "is_anomaly": r.is_anomaly, "error": error}
            self.stream.write(json.dumps(row) + "\n")


def _check_threshold(ctx: click.Context, param: click.Parameter,
                     value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0 (norms are >= 0), got {value}")
    return value


@click.command("score")
@click.argument("paths", nargs=-1, required=True)
@_model_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write rows to FILE.csv or FILE.jsonl (default: CSV on stdout); written "
                   "whole or not at all.")
@click.option("--threshold", type=float, default=None, callback=_check_threshold,
              help="Anomaly when norm < threshold (finite, >= 0); default: the artifact's "
                   "threshold.")
@_backend_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per inference call; default: the backend's maximum.")
@click.option("--workers", type=click.IntRange(min=1), default=min(8, os.cpu_count() or 1),
              show_default=True, help="Threads decoding images.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any image failed.")
def score(paths: tuple[str, ...], model_dir: Path, out: Path | None, threshold: float | None,
          backend: str, precision: str | None, threads: int | None, batch_size: int | None,
          workers: int, strict: bool) -> None:
    """Score image files, directories (recursive) and globs. norm: higher = normal.

    Each image gets a row (path, norm, is_anomaly, error); an image that cannot be scored
    becomes an error row and the run goes on: an unreadable or corrupt file, anything but a
    regular file (a FIFO, a broken symlink), a directory that cannot be listed, a non-finite
    norm. A path that does not exist is a usage error. Paths that are not valid UTF-8 are
    written with \\xNN escapes.
    """
    fmt = "csv"
    if out is not None:
        fmt = {".csv": "csv", ".jsonl": "jsonl"}.get(out.suffix.lower(), "")
        if not fmt:
            raise click.BadParameter("must end in .csv or .jsonl", param_hint="--out")
    problems: dict[str, str] = {}
    try:
        files = expand_paths(paths, problems)
    except PathError as e:
        raise click.BadParameter(str(e), param_hint="PATHS") from None
    if not files:
        raise click.ClickException("no images found in " + " ".join(map(short_path, paths)))
    scorer = _open_scorer(model_dir, backend, precision, threshold, batch_size, threads)
    try:
        with ExitStack() as stack:
            stack.callback(scorer.close)
            stream = sys.stdout
            if out is not None:
                from .atomic import atomic_path

                tmp = stack.enter_context(atomic_path(out))
                stream = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
            _say(f"scoring {len(files)} images with {scorer.backend.name} "
                 f"({scorer.backend.precision}), threshold {scorer.threshold:g}; "
                 f"{_direction(scorer)}")
            results = _with_problems(files, problems, scorer, workers)
            counts = _write_rows(results, len(files), _RowWriter(stream, fmt))
    except OSError as e:  # file-size limit, full disk, read-only directory: nothing is left
        where = "stdout" if out is None else short_path(out)
        raise click.ClickException(f"cannot write {where}: {os_reason(e)}") from None
    n, anomalies, errors, seconds = counts
    _say(f"{n} images: {n - errors} scored, {anomalies} anomalies (norm < {scorer.threshold:g}), "
         f"{errors} errors; {n / seconds:.1f} images/s; {_direction(scorer)}"
         + (f"; wrote {short_path(out)}" if out else ""))
    if strict and errors:
        raise SystemExit(1)


def _with_problems(files: list[str], problems: dict[str, str], scorer: Any,
                   workers: int) -> Iterator[FileResult]:
    """A result per entry of `files`, in order: the scorer's for each scorable file, an error
    row for each entry with a known problem (never opened)."""
    from .scorer import FileResult

    scored = scorer.score_files([p for p in files if p not in problems], workers=workers)
    for p in files:
        yield FileResult(p, error=problems[p]) if p in problems else next(scored)


def _finite(r: FileResult) -> FileResult:
    """A non-finite norm is an error for that image, never a decision (NaN < t is False:
    it would be counted as normal)."""
    if r.error is None and r.norm is not None and not math.isfinite(r.norm):
        from .scorer import FileResult

        return FileResult(r.path, error=f"the model returned a non-finite norm ({r.norm}) for "
                                        "this image; the model file is broken or the image "
                                        "drives it out of range")
    return r


def _write_rows(results: Iterator[FileResult], total: int,
                writer: _RowWriter) -> tuple[int, int, int, float]:
    """Rows for `results` under a progress bar: (images, anomalies, errors, seconds)."""
    from tqdm import tqdm

    n = anomalies = errors = 0
    t0 = time.perf_counter()
    with tqdm(total=total, unit="img", file=sys.stderr, disable=None) as bar:
        for r in map(_finite, results):
            writer.write(r)
            n += 1
            anomalies += r.error is None and bool(r.is_anomaly)
            errors += r.error is not None
            bar.update()
    return n, anomalies, errors, max(time.perf_counter() - t0, 1e-9)


# ----------------------------------------------------------------------------- serve


@click.command("serve")
@_model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_backend_options
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
              callback=lambda ctx, param, v: _model_name(v),
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
    from .serving.config import ServerConfig
    from .serving.process import listen_socket, serve_workers, serving_threads
    from .serving.process import serve as run_server

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:  # before the model loads: a port in use is one line, for one worker or many
        sock = listen_socket(host, port)
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        _say(f"warning: listening on {host}, reachable from other machines")
    limits = {} if max_image_pixels is None else {
        "max_image_pixels": max_image_pixels,
        "max_request_pixels": 4 * max_image_pixels}
    cfg = ServerConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                       max_body_mb=max_body_mb, header_timeout_s=header_timeout,
                       body_timeout_s=body_timeout, max_connections=max_connections,
                       model_name=model_name, grpc_port=grpc_port, grpc_host=host, **limits)
    if grpc_port:
        from .serving.v2_grpc import missing

        if (why := missing()) is not None:
            raise click.ClickException(why)
    if threads is None:
        threads = serving_threads(workers)
    if workers > 1:
        # Opened once here so that a bad artifact fails with one line before any worker starts.
        _open_scorer(model_dir, backend, precision, threshold, threads=threads).close()
        serve_workers(str(model_dir), workers, backend=backend, precision=precision,
                      threshold=threshold, threads=threads, host=host, port=port, config=cfg,
                      log_level=log_level, access_log=access_log, sock=sock)
        return
    scorer = _open_scorer(model_dir, backend, precision, threshold, threads=threads)
    try:
        run_server(scorer, host=host, port=port, config=cfg, log_level=log_level,
                   access_log=access_log, sock=sock)
    finally:
        scorer.close()


# ----------------------------------------------------------------------------- bench


@click.command("bench")
@_model_option
@_backend_options
@click.option("--batch-sizes", default="1,8,32,64", show_default=True,
              help="Backend sweep; sizes above the backend's maximum are skipped.")
@click.option("--iterations", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed calls per batch size (fewer if --max-seconds runs out).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed calls (or requests) before each measurement.")
@click.option("--max-seconds", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Time limit per batch size / concurrency level.")
@click.option("--url", default=None, help="A running `oecl serve` on this machine, e.g. "
              "http://127.0.0.1:8000: adds the concurrency sweep.")
@click.option("--concurrency", "concurrencies", default="1,8,32", show_default=True,
              help="Concurrent clients, one image per request.")
@click.option("--requests", type=click.IntRange(min=1), default=500, show_default=True,
              help="Timed requests per concurrency level.")
@click.option("--http-only", is_flag=True, help="Skip the backend sweep (needs --url).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="oecl-bench",
              show_default=True, help="Directory for bench.json, bench.csv and bench.png.")
def bench(model_dir: Path, backend: str, precision: str | None, threads: int | None,
          batch_sizes: str,
          iterations: int, warmup: int, max_seconds: float, url: str | None,
          concurrencies: str, requests: int, http_only: bool, out: Path) -> None:
    """Throughput (images/s) and latency (min/mean/p50/p90/p95/p99) of a model.

    Sweeps batch sizes on the backend alone and, with --url, concurrency levels against a
    running server. Warm-up is excluded. Prints a table; writes JSON, CSV and a PNG plot.
    """
    from . import bench as B

    sizes = _int_list(batch_sizes)
    levels = _int_list(concurrencies)
    if http_only and not url:
        raise click.BadParameter("--http-only needs --url", param_hint="--http-only")
    if url:
        try:
            B.check_loopback_url(url)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--url") from None
    scorer = _open_scorer(model_dir, backend, precision, None, threads=threads)
    spec = scorer.spec
    macs = _macs_per_image(scorer.artifact)
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "options": {k: str(v) if isinstance(v, Path) else v
                    for k, v in click.get_current_context().params.items()},
        "model": str(model_dir), "backend": scorer.backend.describe(),
        "input": {"channels": spec.channels, "height": spec.height, "width": spec.width},
        "macs_per_image": macs, "device": B.device_info(), "results": [],
    }

    def show(row: dict[str, Any]) -> None:
        what = (f"batch {row['batch_size']}" if row["mode"] == "backend"
                else f"concurrency {row['concurrency']}")
        _say(f"  {row['mode']} {what}: {row['images_per_s']:.1f} images/s, "
             f"p99 {row['latency_ms']['p99']:.2f} ms")

    if not http_only:
        runnable = [s for s in sizes if s <= scorer.backend.max_batch]
        skipped = sorted(set(sizes) - set(runnable))
        if skipped:
            _say(f"skipping batch sizes {skipped}: above the backend maximum "
                 f"{scorer.backend.max_batch}")
        _say(f"backend sweep: {scorer.backend.name} ({scorer.backend.precision})")
        report["results"] += B.bench_backend(
            scorer.backend.run, (spec.channels, spec.height, spec.width), runnable,
            iterations=iterations, warmup=warmup, max_seconds=max_seconds, progress=show,
            macs_per_image=macs)
    if url:
        try:
            report["server"] = B.server_runtime(url)
        except B.HTTPClientError as e:
            raise click.ClickException(str(e)) from None
        bodies = B.request_images(spec, count=min(requests, 256))
        _say(f"HTTP sweep against {url}: {requests} one-image requests per level")
        report["results"] += B.bench_http(url, bodies, levels, requests, warmup=warmup,
                                          time_limit_s=max_seconds * 6, progress=show)
    scorer.close()
    click.echo(B.format_table(report["results"]))
    paths = B.write_report(out, report)
    _say("wrote " + ", ".join(str(p) for p in paths.values()))


def _macs_per_image(artifact: Artifact) -> int | None:
    """Multiply-accumulates per image, from the artifact's ONNX graph (every precision and
    format holds the same network); None when there is no ONNX file or its shapes are dynamic."""
    from .flops import graph_macs

    entry = artifact.find("onnx")
    if entry is None:
        return None
    try:
        return graph_macs(artifact.path_of(entry))
    except ValueError as e:
        _say(f"GFLOP/s not reported: {e}")
        return None


def _direction(scorer: Any) -> str:
    """What the `norm` column holds, and which way is normal."""
    name = scorer.artifact.score_name
    return "norm: higher = normal" if name == "norm" else f"norm = {name}: higher = normal"


# ----------------------------------------------------------------------------- edge box


def _artifact_argument(f: Any) -> Any:
    return click.argument("artifact", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path))(f)


@click.command("verify")
@_artifact_argument
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Backend to check (auto: the one `oecl serve` would pick here).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Model file precision; default: fp32 where present.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report to this JSON file.")
def verify(artifact: Path, backend: str, precision: str | None, out: Path | None) -> None:
    """Score the artifact's golden set here and compare with the exporter's reference norms.

    Reports max/mean relative norm difference and the AUROC of both (ID positive; norm:
    higher = normal); exits 1 outside the tolerances the artifact was exported with.
    """
    from .artifact import ArtifactError
    from .backends import BackendUnavailable
    from .golden import fmt_auroc
    from .golden import verify as run_verify

    try:
        report = run_verify(artifact, backend, precision)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{report['backend']} ({report['precision']}) on {report['n_id']} ID + "
               f"{report['n_ood']} OOD golden images: max rel diff {report['max_rel_diff']:.2e}, "
               f"mean rel diff {report['mean_rel_diff']:.2e}, AUROC {fmt_auroc(report['AUROC'])} "
               f"(reference {fmt_auroc(report['reference_AUROC'])}); score {report['score']}")
    if out is not None:
        from .atomic import write_json

        write_json(out, report)
    click.echo(json.dumps(report))
    if not report["pass"]:
        raise click.ClickException(f"verification failed: {report['problems'][0]}")
    _say("pass")


@click.command("engine")
@_artifact_argument
@click.option("--precision", "precisions", type=click.Choice(ENGINE_PRECISIONS), multiple=True,
              default=("fp16",), show_default=True,
              help="Engine to build (repeat for several): fp16 -> model.plan, int8 -> "
                   "model.int8.plan (from the symmetric int8 ONNX), fp32 -> model.fp32.plan.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Largest batch of the engine's profile; default: the artifact's max_batch.")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=4096, show_default=True,
              help="TensorRT builder workspace (lower it on a small Jetson).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Score the golden set with the new engine; refuse to record one that fails.")
def engine(artifact: Path, precisions: tuple[str, ...], max_batch: int | None,
           workspace_mb: int, verify: bool) -> None:
    """Build TensorRT engines from ARTIFACT's ONNX files on this GPU and record them.

    The engine is valid only for this GPU model and TensorRT version; `oecl.json` gets its
    sha256, TensorRT version, GPU name and compute capability. Needs tensorrt, cuda-python
    and an NVIDIA GPU (no torch).
    """
    from .artifact import ArtifactError
    from .engine import EngineError, build_engines

    try:
        meta = build_engines(artifact, precisions, max_batch, workspace_mb=workspace_mb,
                             verify=verify, log=_say)
    except (ArtifactError, EngineError) as e:
        raise click.ClickException(str(e)) from None
    plans = [f for f in meta["files"] if f["format"] == "tensorrt"]
    click.echo(json.dumps({"artifact": str(artifact), "engines": plans}))


@click.command("triton-repo")
@_artifact_argument
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model repository directory; only the model's own subdirectories are "
                   "written (each replaced only if oecl wrote it).")
@click.option("--name", default=TRITON_MODEL_NAME, show_default=True,
              callback=lambda ctx, param, v: _model_name(v), help="Model name in the repository.")
@click.option("--backend", type=click.Choice(["native", "python"]), default="native",
              show_default=True,
              help="native: Triton's onnxruntime or TensorRT backend runs the file (see "
                   "--image-bytes); python: Triton's Python backend runs oecl_runtime's scorer "
                   "(uint8 images or encoded image_bytes in, norm and is_anomaly out; oecl "
                   "must be installed in Triton's Python).")
@click.option("--image-bytes/--no-image-bytes", default=True, show_default=True,
              help="native: NAME is an ensemble taking uint8 images or encoded image_bytes "
                   "(a Python step decodes with oecl_runtime, then NAME_model); without it, "
                   "NAME is the ONNX or TensorRT model alone (uint8 in, nothing to install).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx",
              show_default=True, help="onnx: Triton's onnxruntime backend; tensorrt: the plan.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Model file precision; default: fp32 where present.")
@click.option("--max-delay-us", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Dynamic batching: longest a request waits for its batch to fill.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device.")
def triton_repo(artifact: Path, out: Path, name: str, backend: str, image_bytes: bool,
                fmt: str, precision: str | None, max_delay_us: int, kind: str,
                instances: int) -> None:
    """Write model NAME of a Triton Inference Server model repository for ARTIFACT.

    <name>/config.pbtxt (max_batch_size and dynamic batching from the artifact) and
    <name>/README.md with the tritonserver command and a client call; the model itself is the
    ONNX or TensorRT file (native), behind an ensemble with a decoding step (<name>_preprocess,
    <name>_model) unless --no-image-bytes, or oecl_runtime's scorer in Triton's Python backend
    (--backend python). Other models in --out are left alone. norm: higher = normal.
    """
    from .artifact import ArtifactError
    from .triton_repo import write_repository

    try:
        summary = write_repository(artifact, out, name=name, fmt=fmt, precision=precision,
                                   max_delay_us=max_delay_us, kind=kind, instances=instances,
                                   backend=backend, image_bytes=image_bytes)
    except ArtifactError as e:
        raise click.ClickException(str(e)) from None
    _say(f"wrote {summary['config']} ({summary['platform']}, {summary['file']}, max batch "
         f"{summary['max_batch_size']}); see {out / name / 'README.md'}")
    click.echo(json.dumps(summary))


class _RuntimeGroup(VerbGroup):
    verbs = RUNTIME_VERBS


@click.group("oecl-runtime", cls=_RuntimeGroup)
def main() -> None:
    """Score, serve and benchmark OECL model artifacts (no torch needed)."""
