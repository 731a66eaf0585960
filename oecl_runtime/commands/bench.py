"""`oecl bench`: throughput and latency of a model on its backend and, with --url, through a
running server; a table, and JSON, CSV and a plot on disk."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .common import backend_options, model_option, open_scorer, say

if TYPE_CHECKING:
    from ..artifact import Artifact


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.command("bench")
@model_option
@backend_options
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
    from .. import bench as B  # deferred: the benchmark loads numpy and Pillow

    sizes = _int_list(batch_sizes)
    levels = _int_list(concurrencies)
    if http_only and not url:
        raise click.BadParameter("--http-only needs --url", param_hint="--http-only")
    if url:
        try:
            B.check_loopback_url(url)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--url") from None
    scorer = open_scorer(model_dir, backend, precision, None, threads=threads)
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
        say(f"  {row['mode']} {what}: {row['images_per_s']:.1f} images/s, "
            f"p99 {row['latency_ms']['p99']:.2f} ms")

    if not http_only:
        runnable = [s for s in sizes if s <= scorer.backend.max_batch]
        skipped = sorted(set(sizes) - set(runnable))
        if skipped:
            say(f"skipping batch sizes {skipped}: above the backend maximum "
                f"{scorer.backend.max_batch}")
        say(f"backend sweep: {scorer.backend.name} ({scorer.backend.precision})")
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
        say(f"HTTP sweep against {url}: {requests} one-image requests per level")
        report["results"] += B.bench_http(url, bodies, levels, requests, warmup=warmup,
                                          time_limit_s=max_seconds * 6, progress=show)
    scorer.close()
    click.echo(B.format_table(report["results"]))
    paths = B.write_report(out, report)
    say("wrote " + ", ".join(str(p) for p in paths.values()))


def _macs_per_image(artifact: Artifact) -> int | None:
    """Multiply-accumulates per image, from the artifact's ONNX graph (every precision and
    format holds the same network); None when there is no ONNX file or its shapes are dynamic."""
    from ..flops import graph_macs  # deferred: it loads onnx

    entry = artifact.find("onnx")
    if entry is None:
        return None
    try:
        return graph_macs(artifact.path_of(entry))
    except ValueError as e:
        say(f"GFLOP/s not reported: {e}")
        return None
