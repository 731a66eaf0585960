"""The series `oecl serve` exposes on /metrics, kept by `prometheus_client`.

With one process the series live in a registry of the app's own. With `--workers N` the
parent sets PROMETHEUS_MULTIPROC_DIR before any worker starts: each worker then writes its values
to files there, and whichever worker answers a scrape sums every worker's files, so /metrics
counts the whole server rather than the worker that happened to answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def powers_of_two(limit: int) -> Iterable[float]:
    """1, 2, 4, ... up to and including `limit` (batch-size buckets)."""
    b = 1
    while b < limit:
        yield float(b)
        b *= 2
    yield float(limit)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def forget_process(pid: int) -> None:
    """Take a dead worker's gauges out of the sums (`oecl_workers`, `oecl_queue_depth`): its
    files would otherwise count on for as long as the server runs. Called by the supervisor."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


class ServerMetrics:
    """Request, error, batch, queue and latency series of one server (all its workers)."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, max_batch: int, model_labels: dict[str, str]) -> None:
        self.shared = multiprocess_dir() is not None
        # Shared: values go to the directory's files, read back by a MultiProcessCollector at
        # scrape time; registering them too would count this worker twice.
        own = None if self.shared else CollectorRegistry()
        self._registry = own
        self.requests = Counter("oecl_requests", "HTTP requests by path and status",
                                ("path", "code"), registry=own)
        self.images = Counter("oecl_images", "Images scored", registry=own)
        self.errors = Counter("oecl_errors", "Failed score requests by reason", ("reason",),
                              registry=own)
        self.batch_size = Histogram("oecl_batch_size", "Images per inference batch",
                                    buckets=list(powers_of_two(max_batch)), registry=own)
        self.queue_depth = Gauge("oecl_queue_depth", "Images waiting for inference",
                                 registry=own, multiprocess_mode="livesum")
        self.latency = Histogram("oecl_request_latency_seconds",
                                 "Time from request arrival to response, /v1/score",
                                 buckets=self.LATENCY_BUCKETS, registry=own)
        self.inference = Histogram("oecl_inference_seconds", "Backend time per batch",
                                   buckets=self.LATENCY_BUCKETS, registry=own)
        self.model_info = Gauge("oecl_model_info", "Backend serving the model (value is always 1)",
                                tuple(model_labels), registry=own, multiprocess_mode="max")
        self.model_info.labels(**model_labels).set(1)
        self.workers = Gauge("oecl_workers", "Worker processes serving requests",
                             registry=own, multiprocess_mode="livesum")
        self.workers.set(1)
        self.connections = Counter("oecl_connections_closed", "Connections closed by the "
                                   "connection cap: shed_idle (the one idle longest, to admit a "
                                   "new one) or refused (none was idle)", ("reason",),
                                   registry=own)
        # Pre-bound children: `labels()` looks its child up under a lock on every call.
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._error_children: dict[str, Counter] = {}

    def request(self, path: str, code: int) -> None:
        child = self._request_children.get((path, code))
        if child is None:
            child = self._request_children[(path, code)] = self.requests.labels(path, str(code))
        child.inc()

    def error(self, reason: str) -> None:
        child = self._error_children.get(reason)
        if child is None:
            child = self._error_children[reason] = self.errors.labels(reason)
        child.inc()

    def connection(self, reason: str) -> None:
        self.connections.labels(reason).inc()

    def batch_count(self) -> int:
        """Batches run by this process (the `_count` of the batch-size histogram)."""
        for family in self.batch_size.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    return int(sample.value)
        return 0

    def render(self) -> bytes:
        if self._registry is not None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
